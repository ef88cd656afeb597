#!/usr/bin/env bash
# Run `ansible-test sanity` for the kubeos.os collection.
#
#   scripts/ansible-test-sanity.sh [extra ansible-test sanity arguments, e.g. --test validate-modules -v]
#
# What it does:
#
# 1. get-pip bootstrap: ansible-test creates one virtualenv per sanity test and bootstraps pip into each one
#    with a get-pip.py script it downloads from https://ci-files.testing.ansible.com/ (unreachable here) and
#    caches at ~/.ansible/test/cache/get_pip_<pip version with "_" for ".">.py (see
#    ansible_test/_util/target/setup/requirements.py, bootstrap()). We put a small replacement at that
#    path: it runs `python -m ensurepip` and then `python -m pip install --cert <system CA bundle> <args>`
#    (args as ansible-test passes them, e.g. `pip==24.2`; the get-pip-only flags --no-setuptools/--no-wheel
#    are honoured by removing what ensurepip brought). The later `pip install` calls of ansible-test
#    inherit PIP_CERT from this script. The venvs are cached under ~/.ansible/test/venv, so only the first
#    run downloads packages.
#
# 2. Which files are tested: inside a git work tree ansible-test takes the file list from
#    `git ls-files --cached --others --exclude-standard` (tracked + untracked-but-not-ignored files). We copy
#    exactly that list (symlinks kept as symlinks) into a temporary ansible_collections/kubeos/os tree outside
#    git and run there. So a local run tests the same files as CI on a clean checkout (once they are committed),
#    never tests git-ignored leftovers (tests/output, __pycache__, ...), is not disturbed by files being
#    edited during the run, does not depend on git's safe.directory/ownership checks, and leaves no
#    tests/output in the working tree. The temporary tree is removed on success and kept (path printed) on
#    failure; set KEEP_SANITY_TREE=1 to always keep it.
#
# Environment: VENV (default <repo>/.venv), ANSIBLE_TEST_PYTHON (default 3.11).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
COLLECTION="$ROOT/collections/ansible_collections/kubeos/os"
VENV=${VENV:-$ROOT/.venv}
PYVER=${ANSIBLE_TEST_PYTHON:-3.11}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

say() { printf 'sanity: %s\n' "$*"; }
die() { printf 'sanity: ERROR: %s\n' "$*" >&2; exit 1; }

[[ -x $VENV/bin/ansible-test ]] || die "$VENV/bin/ansible-test not found; run scripts/setup.sh (make setup) first"
[[ -f $COLLECTION/galaxy.yml ]] || die "no collection at $COLLECTION"

# ansible-test --local --python X.Y looks up pythonX.Y on PATH: make that the project virtualenv, so that
# --requirements never installs into a system interpreter.
export PATH="$VENV/bin:$PATH"
if [[ -f $CA_BUNDLE ]]; then
    export PIP_CERT=${PIP_CERT:-$CA_BUNDLE}
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)

# --- 1. get-pip replacement -----------------------------------------------------------------------------
getpip_path=$("$VENV/bin/python" - <<'EOF'
import os, re, sys
import ansible_test
base = os.path.dirname(ansible_test.__file__)
req = open(os.path.join(base, '_util', 'target', 'setup', 'requirements.py')).read()
pyreq = open(os.path.join(base, '_internal', 'python_requirements.py')).read()
cache = re.search(r"""os\.path\.expanduser\(['"]([^'"]*get_pip_%s\.py)['"] % pip_version\.replace\(['"]\.['"], ['"]_['"]\)\)""", req)
version = re.search(r"""default_packages = dict\(\s*pip=['"]([0-9.]+)['"]""", pyreq)
if not cache or not version:
    sys.exit('cannot find the get-pip cache path / pip version in %s; ansible-test changed, update this script' % base)
print(os.path.expanduser(cache.group(1) % version.group(1).replace('.', '_')))
EOF
) || die "could not work out ansible-test's get-pip cache path"

MARKER='kubeos get-pip replacement'
read -r -d '' getpip_text <<EOF || true
"""$MARKER (written by scripts/ansible-test-sanity.sh).

ansible-test runs this in place of https://ci-files.testing.ansible.com/ansible-test/get-pip-<version>.py,
which cannot be downloaded here, to bootstrap pip into a new, empty virtual environment.
Arguments are pip install arguments (e.g. --disable-pip-version-check pip==24.2 --no-setuptools --no-wheel).
"""
import os
import subprocess
import sys

CA_BUNDLE = '$CA_BUNDLE'
GET_PIP_ONLY = ('--no-setuptools', '--no-wheel')

args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
subprocess.check_call([sys.executable, '-m', 'ensurepip', '--upgrade', '--default-pip'], stdout=subprocess.DEVNULL)
cert = ['--cert', CA_BUNDLE] if os.path.isfile(CA_BUNDLE) else []
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--quiet'] + cert + args)
# get-pip.py installs no setuptools/wheel when asked not to; ensurepip may have brought them (Python < 3.12).
unwanted = [name for flag, name in (('--no-setuptools', 'setuptools'), ('--no-wheel', 'wheel')) if flag in sys.argv[1:]]
if unwanted:
    subprocess.call([sys.executable, '-m', 'pip', 'uninstall', '--quiet', '--yes'] + unwanted,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
EOF

if [[ -f $getpip_path ]] && ! grep -q "$MARKER" "$getpip_path"; then
    say "get-pip: keeping existing (downloaded?) $getpip_path"
elif [[ -f $getpip_path ]] && [[ $(<"$getpip_path") == "$getpip_text" ]]; then
    say "get-pip: replacement in place at $getpip_path"
else
    mkdir -p -- "$(dirname -- "$getpip_path")"
    printf '%s\n' "$getpip_text" >"$getpip_path.tmp"
    mv -f -- "$getpip_path.tmp" "$getpip_path"
    say "get-pip: wrote replacement to $getpip_path"
fi

# --- 2. copy of the collection outside git ------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/kubeos-sanity.XXXXXX")
tree="$work/ansible_collections/kubeos/os"
mkdir -p -- "$tree"
cleanup() {
    local rc=$?
    if [[ $rc -eq 0 && -z ${KEEP_SANITY_TREE:-} ]]; then
        rm -rf -- "$work"
    else
        say "kept the tested tree (with tests/output): $tree"
    fi
}
trap cleanup EXIT

list_files() {
    if git -c safe.directory='*' -C "$COLLECTION" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # The list ansible-test itself would use in the work tree (deleted files are skipped below).
        git -c safe.directory='*' -C "$COLLECTION" ls-files -z --cached --others --exclude-standard
    else
        (cd "$COLLECTION" && find . \( -path ./tests/output -o -name __pycache__ -o -name .mypy_cache \
            -o -name .pytest_cache \) -prune -o \( -type f -o -type l \) -printf '%P\0')
    fi
}
while IFS= read -r -d '' rel; do
    if [[ -e $COLLECTION/$rel || -L $COLLECTION/$rel ]]; then
        printf '%s\0' "$rel"
    fi
done < <(list_files) | tar -C "$COLLECTION" --null --no-recursion -T - -cf - | tar -C "$tree" -xf -
say "testing a copy of $(find "$tree" \( -type f -o -type l \) | wc -l) files in $tree"

# --- 3. ansible-test ---------------------------------------------------------------------------------------
cd "$tree"
say "ansible-test sanity --local --requirements --python $PYVER $*"
rc=0
ansible-test sanity --local --requirements --python "$PYVER" "$@" || rc=$?
say "finished in $(($(date +%s) - start)) s (exit status $rc)"
exit "$rc"
