#!/usr/bin/env bash
# Prepare this machine for developing and testing kubeos (Debian 12 "bookworm", run as root).
#
# Idempotent and cached: a second run only checks and finishes in about a second.
#   1. Debian packages: installs only the missing ones ("apt-get update" only when something is missing).
#   2. The virtualenv .venv/ at the repository root (python3, 3.11), with `pip install -e '.[dev]'`;
#      pip runs again only when pyproject.toml changed (sha256 stamp kept inside .venv).
#
# Environment:
#   PYTHON=/path/to/python3.11   interpreter for a new .venv (default: python3, else python3.11)
#   KUBEOS_SETUP_FORCE=1         reinstall the Python packages even if pyproject.toml did not change
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
VENV="$ROOT/.venv"
STAMP="$VENV/.kubeos-pyproject.sha256"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

APT_PACKAGES=(
    fdisk e2fsprogs dosfstools mtools grub-common grub-efi-amd64-bin ovmf
    qemu-system-x86 qemu-utils busybox-static attr acl openssl tar zstd xz-utils
    util-linux git python3-venv make grub-pc-bin openssh-server openssh-client docker-registry etcd-server debootstrap
)

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

start=$(date +%s.%N)

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs Debian packages); try: sudo $0"
command -v dpkg-query >/dev/null || die "dpkg-query not found: this script supports Debian 12 (bookworm) only"

# --- 1. Debian packages ------------------------------------------------------------------------------------
# One dpkg-query call for all packages; a package is present when its status is "ii" (installed, ok).
installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    grep -qE "^${pkg} ii" <<<"$installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    step "apt: installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    trap 'rm -f -- "$apt_log"' EXIT
    # Output goes to a log that is shown only when apt fails.
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >"$apt_log" 2>&1; then
        cat -- "$apt_log" >&2
        die "apt-get failed installing: ${missing[*]}"
    fi
    step "apt: installed ${#missing[@]} package(s)"
else
    step "apt: all ${#APT_PACKAGES[@]} packages present"
fi

# --- 2. virtualenv -------------------------------------------------------------------------------------------
pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.11; do
        if command -v "$candidate" >/dev/null \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    step "venv: $VENV exists ($("$VENV/bin/python" -V 2>&1))"
else
    python=$(pick_python) || die "no Python 3.11 interpreter found (python3 / python3.11); set PYTHON=..."
    if [[ -e $VENV ]]; then
        step "venv: $VENV is broken, recreating it"
        rm -rf -- "$VENV"
    fi
    step "venv: creating $VENV with $python ($("$python" -V 2>&1))"
    "$python" -m venv "$VENV" || die "python -m venv failed (is python3-venv installed?)"
    rm -f -- "$STAMP"
fi

want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ $want == "$have" && -z ${KUBEOS_SETUP_FORCE:-} ]]; then
    step "pip: up to date with pyproject.toml (sha256 ${want:0:12})"
else
    step "pip: installing -e '.[dev]' (pyproject.toml changed or first run)"
    pip_args=(--quiet --disable-pip-version-check)
    [[ -f $CA_BUNDLE ]] && pip_args+=(--cert "$CA_BUNDLE")
    (cd "$ROOT" && "$VENV/bin/python" -m pip install "${pip_args[@]}" -e '.[dev]') \
        || die "pip install -e '.[dev]' failed"
    printf '%s\n' "$want" >"$STAMP"
    step "pip: done"
fi

end=$(date +%s.%N)
step "ok ($(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s)"
