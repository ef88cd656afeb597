"""``kubeosctl``: the local admin CLI over the agent's socket, for hosts without a cluster.

    kubeosctl status
    kubeosctl upgrade --image URL|oci://REF --sha256 HEX [--version V] [--cacert NAME] [--clientcert NAME --clientkey NAME]
                      [--insecure-http] [--format raw|tar] [--tries N] [--no-reboot] [--prepare-only]
    kubeosctl rollback [--no-reboot]
    kubeosctl mark-good
    kubeosctl config -f FILE [--dry-run] [--reload-sysctl] [--restart-kubelet] [--restart-containerd]
    kubeosctl operations [ID]
    kubeosctl cancel ID

``--json`` prints the API's documents instead of text. While an operation runs, progress goes to stderr:
a bar on a terminal, plain lines otherwise. Exit codes (for scripts):

    0  done
    1  the operation failed, was cancelled or interrupted
    2  usage error, or the agent refused the request (400, 404)
    3  the agent is busy with another operation (409)
    4  the agent cannot be reached
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

import yaml

from .client import AgentClient, AgentUnreachable, Response
from .config import DEFAULT_SOCKET

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_UNREACHABLE = 4

MIB = 1024 * 1024
BAR_WIDTH = 30


class CtlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refusal(resp: Response) -> CtlError:
    err = resp.error
    message = str(err.get("message") or f"HTTP {resp.status}")
    if err.get("field"):
        message = f"{err['field']}: {message}"
    if resp.status == 409:
        running = err.get("running") or {}
        if running:
            message += f" (operation {running.get('id')}, {running.get('kind')}, {running.get('phase')})"
        return CtlError(EXIT_BUSY, message)
    return CtlError(EXIT_USAGE if resp.status < 500 else EXIT_FAILED, message)


# --- progress ------------------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:.1f}"


class Progress:
    """Renders operation documents as they change: a bar on a TTY, one line per step otherwise."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.last_key: tuple[str, str, int] | None = None
        self.width = 0

    def update(self, op: dict[str, Any]) -> None:
        kind, phase = op.get("kind", "?"), op.get("phase", "")
        prog = op.get("progress") or {}
        percent = prog.get("percent")
        done, total = prog.get("bytes_done"), prog.get("bytes_total")
        if self.tty:
            if percent is not None:
                filled = int(BAR_WIDTH * percent / 100)
                bar = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {percent:5.1f}% {_mib(done)}/{_mib(total)} MiB"
            else:
                bar = ""
            line = f"{kind}: {phase:<20} {bar}".rstrip()
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self.width = len(line)
            return
        # Plain text: one line per phase, and one per 10 % of a transfer.
        key = (kind, phase, int(percent // 10) if percent is not None else -1)
        if key == self.last_key:
            return
        self.last_key = key
        line = f"{kind}: {phase}"
        if percent is not None:
            line += f" {percent:.0f}% ({_mib(done)}/{_mib(total)} MiB)"
        self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


# --- commands ------------------------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _slot_line(name: str, slot: dict[str, Any], disk: dict[str, Any]) -> str:
    grub = disk.get("grub") or {}
    marks = []
    if slot.get("bootable"):
        marks.append("bootable")
    else:
        marks.append("not bootable")
    if grub.get("default") == name:
        marks.append("committed")
    if grub.get("trial") == name:
        marks.append(f"on trial ({grub.get('tries')} tries left)")
    if disk.get("running_slot") == name:
        marks.append("running")
    what = slot.get("pretty_name") or "(empty)"
    return f"slot {name}     {what:<24} {', '.join(marks)}"


def _op_line(op: dict[str, Any] | None) -> str:
    if not op:
        return "none"
    line = f"{op.get('id')} {op.get('kind')} {op.get('state')}"
    if op.get("outcome"):
        line += f", {op['outcome']}"
    detail = op.get("outcome_detail") or op.get("error")
    if detail:
        line += f": {detail}"
    return line


def cmd_status(client: AgentClient, args: argparse.Namespace) -> int:
    resp = client.status()
    if not resp.ok:
        raise _refusal(resp)
    body = resp.body
    if args.json:
        _print_json(body)
        return EXIT_OK
    disk = body.get("disk")
    if disk:
        print(f"disk       {disk.get('disk')} (layout {disk.get('layout')})")
        print(f"running    slot {disk.get('running_slot') or '? (root ' + str(disk.get('running_root')) + ')'}")
        for name, slot in sorted((disk.get("slots") or {}).items()):
            print(_slot_line(name, slot, disk))
        grub = disk.get("grub") or {}
        if grub.get("trial_failed"):
            print(f"grub       slot {grub['trial_failed']} failed its trial boot (GRUB fell back)")
    else:
        print(f"disk       unreadable: {body.get('disk_error')}")
    if body.get("disk_stale"):
        print(f"           (as of {body.get('disk_read_at')}: an operation holds the disk)")
    current = body.get("current_operation")
    if current:
        prog = current.get("progress") or {}
        pct = f" {prog['percent']}%" if prog.get("percent") is not None else ""
        print(f"operation  {current.get('id')} {current.get('kind')} {current.get('phase')}{pct}")
    else:
        print("operation  none running")
    print(f"last op    {_op_line(body.get('last_operation'))}")
    print(f"upgrade    {_op_line(body.get('last_upgrade'))}")
    return EXIT_OK


def _follow(client: AgentClient, op: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    progress = None if args.json else Progress(sys.stderr)
    try:
        final = client.wait(op["id"], on_update=progress.update if progress else None, interval=0.25)
    finally:
        if progress:
            progress.done()
    return final


def _run(client: AgentClient, args: argparse.Namespace, operation: str, **fields: Any) -> dict[str, Any]:
    resp = client.start(operation, **fields)
    if resp.status != 202:
        raise _refusal(resp)
    return _follow(client, resp.operation, args)


def _report(op: dict[str, Any], args: argparse.Namespace) -> int:
    ok = op.get("state") == "succeeded"
    if not args.json:
        if ok:
            result = op.get("result") or {}
            print(f"{op.get('kind')}: done" + (f" - {result['message']}" if result.get("message") else ""))
            if op.get("outcome_detail"):
                print(f"  {op['outcome_detail']}")
        else:
            print(f"{op.get('kind')}: {op.get('state')}: {op.get('error')}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def _image_url(image: str) -> str:
    if "://" in image:
        return image
    return "file://" + os.path.abspath(image)


def image_fields(image: str, sha256: str, image_format: str | None, insecure_http: bool) -> dict[str, Any]:
    """prepare_upgrade's image fields for ``--image``: a URL or path, or ``oci://`` for a container image."""
    if image.startswith("oci://"):
        # KubeOS's imagetype containerd: the root filesystem of a container image, pulled by digest.
        fields: dict[str, Any] = {"imagetype": "containerd", "containerimage": image[len("oci://") :]}
    else:
        fields = {"imagetype": "disk", "imageurl": _image_url(image), "format": image_format or "raw"}
    fields.update(checksum=sha256, flagSafe=insecure_http)
    return fields


def cmd_upgrade(client: AgentClient, args: argparse.Namespace) -> int:
    fields = image_fields(args.image, args.sha256, args.format, args.insecure_http)
    if args.version:
        fields["version"] = args.version
    if args.cacert:
        fields["cacert"] = args.cacert
    if args.clientcert or args.clientkey:
        fields.update(mtls=True, clientcert=args.clientcert or "", clientkey=args.clientkey or "")
    documents: dict[str, Any] = {}
    prepared = _run(client, args, "prepare_upgrade", **fields)
    documents["prepare_upgrade"] = prepared
    code = _report(prepared, args)
    if code == EXIT_OK and not args.prepare_only:
        upgrade: dict[str, Any] = {"reboot": not args.no_reboot}
        if args.tries:
            upgrade["tries"] = args.tries
        armed = _run(client, args, "upgrade", **upgrade)
        documents["upgrade"] = armed
        code = _report(armed, args)
    if args.json:
        _print_json(documents)
    return code


def _simple(operation: str, **fixed: Any) -> Any:
    def command(client: AgentClient, args: argparse.Namespace) -> int:
        fields = dict(fixed)
        if operation == "rollback":
            fields["reboot"] = not args.no_reboot
        op = _run(client, args, operation, **fields)
        code = _report(op, args)
        if args.json:
            _print_json(op)
        return code

    return command


def load_sysconfigs(path: str, *, upgradeconfigs: bool = False) -> dict[str, Any]:
    """``version`` and ``configs`` from a YAML (or JSON) file: KubeOS's sysconfigs shape ``{version, configs}``,
    a bare list of configs, or a whole ``OS`` object (its ``spec.sysconfigs``, or ``spec.upgradeconfigs``)."""
    try:
        with open(path, encoding="utf-8") if path != "-" else sys.stdin as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise CtlError(EXIT_USAGE, f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CtlError(EXIT_USAGE, f"{path} is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and data.get("kind") == "OS":
        name = "upgradeconfigs" if upgradeconfigs else "sysconfigs"
        data = (data.get("spec") or {}).get(name)
        if data is None:
            raise CtlError(EXIT_USAGE, f"{path}: the OS object has no spec.{name}")
    if isinstance(data, list):
        data = {"configs": data}
    if not isinstance(data, dict) or "configs" not in data:
        raise CtlError(
            EXIT_USAGE, f"{path} must hold KubeOS sysconfigs - {{version, configs: [...]}} - or an OS object"
        )
    unknown = sorted(set(data) - {"version", "configs"})
    if unknown:
        raise CtlError(
            EXIT_USAGE, f"{path}: unknown field(s) {', '.join(unknown)}; sysconfigs have version and configs"
        )
    out: dict[str, Any] = {"configs": data.get("configs") or []}
    if data.get("version") is not None:
        out["version"] = str(data["version"])
    return out


def _print_applied(op: dict[str, Any]) -> None:
    result = op.get("result") or {}
    for entry in result.get("applied") or []:
        where = entry.get("target", "")
        for item in entry.get("contents") or []:
            if not item.get("changed") and not item.get("note"):
                continue
            change = f"{json.dumps(item.get('before'))} -> {json.dumps(item.get('after'))}"
            note = f" ({item['note']})" if item.get("note") else ""
            print(f"  {entry.get('model')} {where}: {item.get('key')} {change}{note}")


def cmd_config(client: AgentClient, args: argparse.Namespace) -> int:
    fields = load_sysconfigs(args.file, upgradeconfigs=args.upgradeconfigs)
    fields.update(
        dry_run=args.dry_run,
        reload_sysctl=args.reload_sysctl,
        restart_kubelet=args.restart_kubelet,
        restart_containerd=args.restart_containerd,
    )
    op = _run(client, args, "configure", **fields)
    code = _report(op, args)
    if args.json:
        _print_json(op)
    elif code == EXIT_OK:
        _print_applied(op)
    return code


def cmd_operations(client: AgentClient, args: argparse.Namespace) -> int:
    if args.id:
        resp = client.get(args.id)
        if not resp.ok:
            raise _refusal(resp)
        if args.json:
            _print_json(resp.operation)
        else:
            op = resp.operation
            print(_op_line(op))
            for event in op.get("events") or []:
                task = f" [{event['task']}]" if event.get("task") else ""
                print(f"  {event.get('time')} {event.get('kind')}{task} {event.get('message')}")
        return EXIT_OK
    resp = client.operations()
    if not resp.ok:
        raise _refusal(resp)
    if args.json:
        _print_json(resp.body)
        return EXIT_OK
    for op in resp.body.get("operations") or []:
        print(f"{op.get('created')}  {_op_line(op)}")
    return EXIT_OK


def cmd_cancel(client: AgentClient, args: argparse.Namespace) -> int:
    resp = client.cancel(args.id)
    if not resp.ok:
        raise _refusal(resp)
    op = _follow(client, resp.operation, args)
    if args.json:
        _print_json(op)
    else:
        print(f"{op.get('id')}: {op.get('state')}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubeosctl",
        description="Talk to the local kubeos agent.",
        epilog="exit codes: 0 done, 1 operation failed, 2 usage or refused request, 3 busy, 4 agent unreachable",
    )
    parser.add_argument("--socket", default=os.environ.get("KUBEOS_AGENT_SOCKET", str(DEFAULT_SOCKET)))
    parser.add_argument("--json", action="store_true", help="print the API's JSON documents")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each API answer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("status", help="slots, versions, GRUB state, current operation").set_defaults(func=cmd_status)

    up = sub.add_parser("upgrade", help="write an image into the inactive slot, arm a trial boot, reboot")
    up.add_argument(
        "--image",
        required=True,
        help="https://…, http://… (with --insecure-http), file:///…, a path, or oci://registry/repo@sha256:… "
        "(a container image whose root filesystem is the OS; --sha256 is then the image digest)",
    )
    up.add_argument("--sha256", required=True, help="sha256 of the image")
    up.add_argument("--version", default="", help="the version the image holds (checked after writing)")
    up.add_argument("--cacert", default="", help="CA certificate, a file name in the agent's certificate directory")
    up.add_argument("--clientcert", default="", help="client certificate for mutual TLS (in the certificate dir)")
    up.add_argument("--clientkey", default="", help="client key for mutual TLS (in the certificate dir)")
    up.add_argument("--insecure-http", action="store_true", help="allow a plain http:// image (KubeOS flagSafe)")
    up.add_argument("--format", choices=["raw", "tar"], help="disk images: raw filesystem image (default) or tar")
    up.add_argument("--tries", type=int, default=0, help="boots the new slot gets before GRUB falls back")
    up.add_argument("--no-reboot", action="store_true", help="arm the trial boot but do not reboot")
    up.add_argument("--prepare-only", action="store_true", help="only write the inactive slot")
    up.set_defaults(func=cmd_upgrade)

    rb = sub.add_parser("rollback", help="commit the other slot (if bootable) and reboot into it")
    rb.add_argument("--no-reboot", action="store_true")
    rb.set_defaults(func=_simple("rollback"))

    sub.add_parser("mark-good", help="commit the running slot").set_defaults(func=_simple("mark_good"))

    cfg = sub.add_parser("config", help="apply KubeOS configuration models (sysconfigs) from a file, all or nothing")
    cfg.add_argument(
        "-f", "--file", required=True, help="YAML: {version, configs: [...]}, or an OS object; - for stdin"
    )
    cfg.add_argument("--upgradeconfigs", action="store_true", help="from an OS object, take spec.upgradeconfigs")
    cfg.add_argument("--dry-run", action="store_true", help="check and show the changes, write nothing")
    cfg.add_argument("--reload-sysctl", action="store_true", help="load changed persistent sysctl files")
    cfg.add_argument("--restart-kubelet", action="store_true", help="restart kubelet if its configuration changed")
    cfg.add_argument("--restart-containerd", action="store_true", help="restart containerd if its config changed")
    cfg.set_defaults(func=cmd_config)

    ops = sub.add_parser("operations", help="recent operations, or one with its events")
    ops.add_argument("id", nargs="?")
    ops.set_defaults(func=cmd_operations)

    cancel = sub.add_parser("cancel", help="cancel the running operation")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = AgentClient(args.socket, timeout=args.timeout)
    try:
        code: int = args.func(client, args)
    except AgentUnreachable as exc:
        print(f"kubeosctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CtlError as exc:
        print(f"kubeosctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(
            "kubeosctl: interrupted; the operation goes on in the agent (kubeosctl cancel ID stops it)", file=sys.stderr
        )
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
