#!/usr/bin/env bash
# Build the kubeos node OS for the VM tests (Debian bookworm + systemd + python3 + the os-agent + the kubeos.os
# collection, debootstrap'ed), or find it up to date in the cache. The builder is tools/vmtest/nodeos/build.py;
# this script runs it with the repository's .venv when there is one.
#
#   scripts/build-node-os.sh [--force] [--force-base] [--cache DIR] [--print-manifest]
#
# Cache: $KUBEOS_NODEOS_CACHE, default /var/cache/kubeos/nodeos (base/: the debootstrap'ed base as a tar;
# out/<stamp>/: the payloads node-v1.ext4 and node-v2.ext4 with their manifests). The base is rebuilt only when
# its package list, requirements or base-setup.sh change; out/ when anything that goes into the node changes
# (tools/vmtest/nodeos/, agent/, pyproject.toml, the agent's unit, the collection). Needs root, debootstrap,
# and the Debian mirror and PyPI while building. See docs/node-vm-test.md.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then python=$ROOT/.venv/bin/python; else python=python3; fi
fi
exec "$python" "$ROOT/tools/vmtest/nodeos/build.py" "$@"
