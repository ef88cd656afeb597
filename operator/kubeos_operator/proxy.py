"""os-proxy: one per node. Takes the operation the operator gave its node through to the end.

Every round it reads its OSInstance, the OS object named there and the agent's status, asks
:func:`decide.next_step` what to do, and does that one step: upgradeconfigs → prepare (the agent writes the
other slot) → cordon → drain → upgrade (the agent arms the trial boot and reboots) → after the reboot, wait
for the agent's commit → sysconfigs → uncordon → idle; rollback: drain → agent rollback. A failed attempt
uncordons the node, records why, and is retried with backoff up to ``maxretries``; then the node is
``failed``. It watches only its own OSInstance (a field selector on its name) to wake up early; the truth
is always what it reads at the start of a round.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os as _os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from kubernetes import watch as k8s_watch

from kubeos_agent.client import AgentClient, AgentUnreachable

from . import names
from .agentview import AgentView, OperationView
from .decide import Decision, Step, backoff_seconds, next_step
from .drain import Drainer
from .kube import Kube, NotFound, api_client, now_iso
from .models import (
    OS,
    ConfigSet,
    NodeView,
    OSInstance,
    OSInstanceSpec,
    OSInstanceStatus,
    Phase,
    find_condition,
    set_condition,
)

log = logging.getLogger("kubeos_proxy")

CORDONED_BY = "upgrade.openeuler.org/cordoned-by"


class AttemptFailed(Exception):
    """This attempt failed; retried with backoff while attempts are left."""


class Permanent(Exception):
    """Retrying cannot help: the node is failed at once."""


class Stopping(Exception):
    """The proxy is stopping (its pod is deleted, the node reboots): not a failure of the operation. The
    OSInstance status keeps what was done, and the next proxy goes on from there."""


class Proxy:
    def __init__(
        self,
        kube: Kube,
        agent: AgentClient,
        node: str,
        *,
        own_pod: str = "",
        backoff_base: float = 10.0,
        poll: float = 5.0,
        drainer: Drainer | None = None,
    ) -> None:
        self.kube = kube
        self.agent = agent
        self.node = node
        self.own_pod = own_pod
        self.backoff_base = backoff_base
        self.poll = poll
        self.drainer = drainer or Drainer(kube.api)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.inst: OSInstance = OSInstance(node, kube.namespace)
        self.node_uid = ""

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> None:
        watcher = threading.Thread(target=self._watch, name="watch", daemon=True)
        watcher.start()
        while not self.stop.is_set():
            try:
                wait = self.round()
            except Exception:  # keep the node's proxy alive whatever one round ran into
                log.exception("round failed; next one in %gs", self.poll)
                wait = self.poll
            self.wake.wait(max(0.2, min(wait, self.poll) if wait else self.poll))
            self.wake.clear()

    def _watch(self) -> None:
        """Wake the loop when the OSInstance changes (reconnects with backoff; the loop polls anyway)."""
        delay = 1.0
        while not self.stop.is_set():
            w = k8s_watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for _ in w.stream(  # type: ignore[no-untyped-call]
                    self.kube.custom.list_namespaced_custom_object,
                    names.GROUP,
                    names.VERSION,
                    self.kube.namespace,
                    names.OSINSTANCE_PLURAL,
                    field_selector=f"metadata.name={self.node}",
                    timeout_seconds=120,
                ):
                    self.wake.set()
                    delay = 1.0
                    if self.stop.is_set():
                        break
            except Exception as exc:  # network errors, 410 Gone: start a fresh watch
                log.debug("watch ended: %s", exc)
                self.stop.wait(delay)
                delay = min(30.0, delay * 2)
            finally:
                w.stop()  # type: ignore[no-untyped-call]

    def round(self) -> float:
        """One step; returns how long to wait before the next round (0: at once)."""
        if not self.node_uid:
            self.node_uid = str((self._node().get("metadata") or {}).get("uid") or "")
        try:
            self.inst = self.kube.get_osinstance(self.node)
        except NotFound:
            self.kube.create_osinstance(self.node, OSInstanceSpec())
            self.inst = self.kube.get_osinstance(self.node)
            self._status(phase=Phase.IDLE.value, lastTransitionTime=now_iso())
            log.info("created OSInstance %s/%s", self.kube.namespace, self.node)
        os = self._os()
        agent, followed = self._agent()
        decision = next_step(self.inst, os, agent, followed, datetime.datetime.now(datetime.UTC))
        if decision.step not in (Step.IDLE, Step.WAIT_REBOOT, Step.BACKOFF, Step.AGENT_DOWN, Step.WAIT_VERIFY):
            log.info("step %s %s", decision.step.value, decision.reason)
        return self._do(decision, os, agent)

    def _os(self) -> OS | None:
        ref = self.inst.spec.namespacedname
        if self.inst.spec.nodestatus == "idle" or not ref.name:
            return None
        try:
            return self.kube.get_os(ref.namespace or "default", ref.name)
        except NotFound:
            return None

    def _agent(self) -> tuple[AgentView | None, OperationView | None]:
        try:
            resp = self.agent.status()
        except AgentUnreachable as exc:
            self._condition("AgentReachable", False, "Unreachable", str(exc))
            return None, None
        if not resp.ok:
            self._condition("AgentReachable", False, "BadAnswer", f"GET /v1/status answered {resp.status}")
            return None, None
        view = AgentView.from_dict(resp.body)
        self._condition("AgentReachable", True, "Answers", "")
        booted = {"bootedSlot": view.running_slot, "bootedVersion": view.running_version}
        if (self.inst.status.bootedSlot, self.inst.status.bootedVersion) != (
            booted["bootedSlot"],
            booted["bootedVersion"],
        ):
            self._status(**booted)
        followed = None
        op_id = self.inst.status.agentOperation
        if op_id:
            try:
                op = self.agent.get(op_id)
                followed = OperationView.from_dict(op.operation) if op.ok else None
            except AgentUnreachable:
                return None, None
        return view, followed

    # --- the steps ------------------------------------------------------------------------------------------

    def _do(self, decision: Decision, os: OS | None, agent: AgentView | None) -> float:
        step = decision.step
        if step == Step.IDLE:
            self._tidy()
            return self.poll
        if step == Step.OS_GONE:
            self._fail(decision.reason)
            return 0
        assert os is not None
        if step == Step.BEGIN:
            self._begin(os)
            return 0
        if step == Step.RELEASE:
            self._release()
            return 0
        if step in (Step.AGENT_DOWN, Step.BACKOFF, Step.WAIT_REBOOT, Step.WAIT_VERIFY):
            if step == Step.WAIT_VERIFY:
                self._phase(Phase.VERIFYING, "the agent checks the new slot before it commits it")
            return decision.wait
        if step == Step.FAIL:
            self._fail(decision.reason)
            return 0
        if step == Step.ATTEMPT_FAILED:
            self._attempt_failed(os, decision.reason)
            return 0
        try:
            if step == Step.FOLLOW:
                self._follow(self.inst.status.agentOperation)
            elif step == Step.FINISH:
                self._finish(os)
            elif step == Step.CONFIGURE:
                self._configure(os)
            elif step == Step.UPGRADE:
                self._upgrade(os)
            elif step == Step.ROLLBACK:
                self._rollback(os, agent)
        except Stopping as exc:
            log.info("%s; the next proxy goes on from the OSInstance status", exc)
        except Permanent as exc:
            self._fail(str(exc))
        except (AttemptFailed, AgentUnreachable) as exc:
            self._attempt_failed(os, str(exc))
        return 0

    def _begin(self, os: OS) -> None:
        self._status(
            phase=Phase.PENDING.value,
            os=os.key,
            opstype=os.spec.opstype,
            target=os.spec.target,
            attempts=0,
            lastError="",
            agentOperation="",
            nextAttemptAt="",
            startedAt=now_iso(),
            finishedAt="",
            lastTransitionTime=now_iso(),
            progress={"message": f"{os.spec.opstype} {os.spec.target} assigned by {os.key}"},
        )
        self._event("Normal", "OperationStarted", f"{os.spec.opstype} to {os.spec.target} (OS {os.key})")

    def _upgrade(self, os: OS) -> None:
        spec = os.spec
        self._phase(Phase.PREPARING, "applying upgradeconfigs")
        self._upgradeconfigs(os)
        request: dict[str, Any] = {
            "version": spec.osversion,
            "imagetype": spec.imagetype,
            "imageurl": spec.imageurl,
            "containerimage": spec.containerimage,
            "checksum": spec.checksum,
            "flagSafe": spec.flagSafe,
            "mtls": spec.mtls,
            "cacert": spec.cacert,
            "clientcert": spec.clientcert,
            "clientkey": spec.clientkey,
        }
        self._phase(Phase.PREPARING, f"writing {spec.osversion} into the other slot")
        op = self._run_agent("prepare_upgrade", request)
        if op.result.get("version_matches") is False:
            raise Permanent(
                f"the image holds {op.result.get('version') or 'an unknown version'}, not {spec.osversion}: "
                "fix osversion or the image"
            )
        self._cordon()
        self._drain(os)
        self._phase(Phase.REBOOTING, "switching to the new slot and rebooting")
        upgrade: dict[str, Any] = {"version": spec.osversion}
        if not spec.healthchecks.empty:
            upgrade["health"] = spec.healthchecks.to_dict()
        self._run_agent("upgrade", upgrade, record=True)
        # The agent reboots the node now; the next rounds wait for it (WAIT_REBOOT), then verify.

    def _rollback(self, os: OS, agent: AgentView | None) -> None:
        self._phase(Phase.PREPARING, "applying upgradeconfigs")
        self._upgradeconfigs(os)
        self._cordon()
        self._drain(os)
        slot = agent.other_slot if agent else "?"
        self._phase(Phase.REBOOTING, f"switching back to slot {slot} and rebooting")
        self._run_agent("rollback", {}, record=True)

    def _configure(self, os: OS) -> None:
        wanted = self.inst.spec.sysconfigs
        self._phase(Phase.PREPARING, f"applying sysconfigs {wanted.version}")
        self._apply_configs(wanted)
        self._status(sysconfigs=wanted.to_dict())

    def _finish(self, os: OS) -> None:
        wanted = self.inst.spec.sysconfigs
        if os.spec.opstype != "config" and wanted.version and wanted.version != self.inst.status.sysconfigs.version:
            self._phase(Phase.VERIFYING, f"applying sysconfigs {wanted.version} on the new slot")
            self._apply_configs(wanted)
            self._status(sysconfigs=wanted.to_dict())
        self._uncordon()
        self._status(
            phase=Phase.DONE.value,
            lastError="",
            nextAttemptAt="",
            finishedAt=now_iso(),
            lastTransitionTime=now_iso(),
            progress={"percent": 100.0, "message": f"{os.spec.opstype} to {os.spec.target} done"},
        )
        self._event("Normal", "OperationDone", f"{os.spec.opstype} to {os.spec.target} done")
        log.info("%s to %s done", os.spec.opstype, os.spec.target)
        self._release()

    def _upgradeconfigs(self, os: OS) -> None:
        wanted = self.inst.spec.upgradeconfigs
        if wanted.version and wanted.version != self.inst.status.upgradeconfigs.version:
            self._apply_configs(wanted)
            self._status(upgradeconfigs=wanted.to_dict())

    def _apply_configs(self, configs: ConfigSet) -> None:
        if not configs.configs:
            return
        body = configs.to_dict()
        self._run_agent("configure", {"version": body["version"], "configs": body["configs"]})

    # --- the agent ------------------------------------------------------------------------------------------

    def _run_agent(self, operation: str, fields: dict[str, Any], *, record: bool = False) -> OperationView:
        """Start an agent operation (or join the same kind already running) and follow it to its end."""
        resp = self.agent.start(operation, **fields)
        if resp.status == 409 and isinstance(resp.body.get("error", {}).get("running"), dict):
            running = OperationView.from_dict(resp.body["error"]["running"])
            if running.kind != operation:
                raise AttemptFailed(f"the agent is busy with {running.kind} {running.id}")
            op_id = running.id
        elif resp.status == 400:
            raise Permanent(
                f"the agent refused {operation}: {resp.error.get('message', '')} ({resp.error.get('field', '')})"
            )
        elif not resp.ok:
            raise AttemptFailed(f"the agent answered {resp.status} to {operation}: {resp.error.get('message', '')}")
        else:
            op_id = str(resp.operation.get("id"))
        if record:
            self._status(agentOperation=op_id)
        return self._follow(op_id)

    def _follow(self, op_id: str) -> OperationView:
        last_write = 0.0
        while True:
            resp = self.agent.get(op_id)
            if not resp.ok:
                raise AttemptFailed(f"cannot follow agent operation {op_id}: {resp.error.get('message', resp.status)}")
            op = OperationView.from_dict(resp.operation)
            if not op.running:
                break
            if time.monotonic() - last_write > 2.0:
                progress: dict[str, Any] = {"message": f"{op.kind}: {op.phase}"}
                if op.percent is not None:
                    progress["percent"] = op.percent
                self._status(progress=progress)
                last_write = time.monotonic()
            if self.stop.wait(0.5):
                # The agent goes on by itself; the next proxy follows the operation from agentOperation.
                raise Stopping(f"stopped while following agent operation {op_id}")
        if op.state != "succeeded":
            raise AttemptFailed(f"agent {op.kind} {op.state}: {op.error or op.phase}")
        return op

    # --- the node -------------------------------------------------------------------------------------------

    def _node(self) -> dict[str, Any]:
        return self.kube.get_node(self.node)

    def _cordon(self) -> None:
        node = self._node()
        if (node.get("spec") or {}).get("unschedulable"):
            return  # cordoned already (by us, or by an admin: then it is theirs to undo)
        self.kube.core.patch_node(
            self.node,
            {"spec": {"unschedulable": True}, "metadata": {"annotations": {CORDONED_BY: names.PROXY_COMPONENT}}},
            _content_type="application/merge-patch+json",
        )
        self._condition("Cordoned", True, "CordonedForOperation", "")
        self._event("Normal", "Cordoned", "cordoned for the OS operation")

    def _uncordon(self) -> None:
        node = self._node()
        if ((node.get("metadata") or {}).get("annotations") or {}).get(CORDONED_BY) != names.PROXY_COMPONENT:
            return
        self.kube.core.patch_node(
            self.node,
            {"spec": {"unschedulable": None}, "metadata": {"annotations": {CORDONED_BY: None}}},
            _content_type="application/merge-patch+json",
        )
        self._condition("Cordoned", False, "Uncordoned", "")
        self._event("Normal", "Uncordoned", "uncordoned")

    def _drain(self, os: OS) -> None:
        timeout = float(os.spec.draintimeout)
        self._phase(Phase.DRAINING, f"evicting pods (timeout {timeout:g}s)")

        def progress(message: str) -> None:
            self._status(progress={"message": message})

        result = self.drainer.drain(
            self.node,
            force=os.spec.evictpodforce,
            timeout=timeout,
            own_pod=self.own_pod,
            stop=self.stop,
            on_progress=progress,
        )
        if not result.ok and self.stop.is_set():
            self._uncordon()  # never left cordoned; the next proxy cordons and drains again
            raise Stopping(f"stopped while draining: {result.reason}")
        if not result.ok:
            self._condition("Drained", False, "DrainFailed", result.reason)
            raise AttemptFailed(f"drain aborted: {result.reason}")
        self._condition("Drained", True, "Drained", f"{len(result.evicted)} pod(s) evicted")

    def _tidy(self) -> None:
        """No operation: no label of ours, no cordon of ours may stay (a crash may have left them)."""
        node = self._node()
        view = NodeView.from_dict(node)
        leftovers = [
            label
            for label in (names.LABEL_UPGRADING, names.LABEL_CONFIGURING, names.LABEL_SERIAL)
            if label in view.labels
        ]
        # The operator writes the OSInstance before the label: read it again, so that a label just added
        # for a new operation is not taken for a leftover.
        if (
            leftovers
            and self.inst.status.phase in (Phase.DONE, Phase.FAILED, Phase.IDLE)
            and self.kube.get_osinstance(self.node).spec.nodestatus == "idle"
        ):
            self.kube.patch_node_labels(self.node, remove=leftovers)
        self._uncordon()

    def _release(self) -> None:
        """Hand the node back: nodestatus idle first, then the labels (the operator counts either as busy)."""
        self._uncordon()
        if self.inst.spec.nodestatus != "idle":
            self.kube.patch_osinstance_spec(self.node, {"nodestatus": "idle"})
        self.kube.patch_node_labels(
            self.node, remove=[names.LABEL_UPGRADING, names.LABEL_CONFIGURING, names.LABEL_SERIAL]
        )

    # --- failures -------------------------------------------------------------------------------------------

    def _attempt_failed(self, os: OS, reason: str) -> None:
        attempts = self.inst.status.attempts + 1
        try:
            self._uncordon()
        except Exception as exc:  # the reason of the failure matters more; the next round uncordons
            log.warning("cannot uncordon after a failed attempt: %s", exc)
        log.warning("attempt %d of %d failed: %s", attempts, os.spec.maxretries, reason)
        if attempts >= max(1, os.spec.maxretries):
            self._status(attempts=attempts)
            self._fail(f"{reason} (attempt {attempts} of {os.spec.maxretries})")
            return
        delay = backoff_seconds(attempts, self.backoff_base)
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
        self._status(
            phase=Phase.PENDING.value,
            attempts=attempts,
            lastError=reason,
            agentOperation="",
            nextAttemptAt=at.isoformat(timespec="seconds").replace("+00:00", "Z"),
            lastTransitionTime=now_iso(),
            progress={"message": f"attempt {attempts} failed; next in {delay:g}s"},
        )
        self._event("Warning", "AttemptFailed", f"attempt {attempts} of {os.spec.maxretries} failed: {reason}")

    def _fail(self, reason: str) -> None:
        log.error("operation failed: %s", reason)
        try:
            self._uncordon()
        except Exception as exc:
            log.warning("cannot uncordon the failed node: %s", exc)
        self._status(
            phase=Phase.FAILED.value,
            lastError=reason,
            nextAttemptAt="",
            finishedAt=now_iso(),
            lastTransitionTime=now_iso(),
            progress={"message": "failed"},
        )
        self._event("Warning", "OperationFailed", reason)
        self._release()

    # --- status ---------------------------------------------------------------------------------------------

    def _phase(self, phase: Phase, message: str) -> None:
        if self.inst.status.phase == phase.value and self.inst.status.progress.message == message:
            return
        changes: dict[str, Any] = {"progress": {"message": message}}
        if self.inst.status.phase != phase.value:
            changes.update(phase=phase.value, lastTransitionTime=now_iso())
            self._event("Normal", f"Phase{phase.value.capitalize()}", message)
        self._status(**changes)

    def _status(self, **changes: Any) -> None:
        """Merge ``changes`` into the OSInstance status (the proxy is its only writer)."""
        if not changes:
            return
        self.kube.patch_osinstance_status(self.node, changes)
        merged = {**self.inst.status.to_dict(), **changes}
        self.inst = replace(self.inst, status=OSInstanceStatus.from_dict(merged))

    def _condition(self, kind: str, value: bool, reason: str, message: str) -> None:
        old = find_condition(self.inst.status.conditions, kind)
        if (
            old is not None
            and (old.status == ("True" if value else "False"))
            and (old.reason, old.message)
            == (
                reason,
                message,
            )
        ):
            return
        new = set_condition(self.inst.status.conditions, kind, value, reason, message, now_iso())
        self._status(conditions=[c.to_dict() for c in new])

    def _event(self, type_: str, reason: str, message: str) -> None:
        self.kube.record_event(
            kind="Node",
            name=self.node,
            namespace="",
            uid=self.node_uid,
            type_=type_,
            reason=reason,
            message=message,
            component=names.PROXY_COMPONENT,
            host=self.node,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = _os.environ.get
    parser = argparse.ArgumentParser(prog="kubeos-proxy", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--node", default=env("NODE_NAME"), help="this node's name (default $NODE_NAME)")
    parser.add_argument("--kubeconfig", default=env("KUBECONFIG"))
    parser.add_argument("--agent-socket", default=env("KUBEOS_AGENT_SOCKET", "/run/kubeos/agent.sock"))
    parser.add_argument(
        "--osinstance-namespace", default=env("KUBEOS_OSINSTANCE_NAMESPACE", names.DEFAULT_OSINSTANCE_NAMESPACE)
    )
    parser.add_argument("--backoff", type=float, default=float(env("KUBEOS_PROXY_BACKOFF", "10")))
    parser.add_argument("--poll", type=float, default=float(env("KUBEOS_PROXY_POLL", "5")))
    parser.add_argument("--log-level", default=env("KUBEOS_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if not args.node:
        parser.error("--node (or $NODE_NAME, from the downward API) is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s kubeos-proxy[{args.node}] %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    own = f"{_os.environ.get('POD_NAMESPACE', '')}/{_os.environ.get('POD_NAME', '')}"
    kube = Kube(api_client(args.kubeconfig), args.osinstance_namespace)
    proxy = Proxy(
        kube,
        AgentClient(args.agent_socket, timeout=30),
        args.node,
        own_pod=own if own != "/" else "",
        backoff_base=args.backoff,
        poll=args.poll,
    )

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        proxy.stop.set()
        proxy.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("kubeos-proxy for node %s: agent %s, OSInstances in %s", args.node, args.agent_socket, kube.namespace)
    proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
