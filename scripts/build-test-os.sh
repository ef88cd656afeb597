#!/usr/bin/env bash
# Build the kubeos boot-test OS (Debian kernel, busybox initramfs, root filesystems v1 v2 v3), or find it
# up to date in the cache. The builder is tools/vmtest/testos/build.py (Python standard library only); this
# script runs it with the repository's .venv when there is one.
#
#   scripts/build-test-os.sh [--force] [--cache DIR] [--print-manifest]
#
# Cache: $KUBEOS_TESTOS_CACHE, default /var/cache/kubeos/testos (outputs in out/, manifest.json there).
# Rebuilt only when missing or when a file under tools/vmtest/testos/ changed. Needs root.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then python=$ROOT/.venv/bin/python; else python=python3; fi
fi
exec "$python" "$ROOT/tools/vmtest/testos/build.py" "$@"
