"""The names kubeos shares with KubeOS: API group, kinds, labels; and the names it adds."""

from __future__ import annotations

GROUP = "upgrade.openeuler.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
OS_PLURAL = "os"
OSINSTANCE_PLURAL = "osinstances"

# Node labels (KubeOS's).
LABEL_UPGRADING = "upgrade.openeuler.org/upgrading"
LABEL_CONFIGURING = "upgrade.openeuler.org/configuring"
LABEL_SERIAL = "upgrade.openeuler.org/serial"
LABEL_NODE_SELECTOR = "upgrade.openeuler.org/node-selector"
# On an OSInstance: the node it belongs to.
LABEL_OSINSTANCE_NODE = "upgrade.openeuler.org/osinstance-node"
LABEL_CONTROL_PLANE = "node-role.kubernetes.io/control-plane"
# Older clusters mark control-plane nodes with this one (kubeadm before 1.24).
LABEL_MASTER = "node-role.kubernetes.io/master"

# Special nodeselector values.
SELECT_NO_LABEL = "no-label"
SELECT_ALL_LABEL = "all-label"

# Where OSInstances live: KubeOS keeps them in "default".
DEFAULT_OSINSTANCE_NAMESPACE = "default"

# Who writes what (server-side apply field managers and Event sources).
OPERATOR_COMPONENT = "kubeos-operator"
PROXY_COMPONENT = "kubeos-proxy"
