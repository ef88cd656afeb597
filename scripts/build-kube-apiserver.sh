#!/usr/bin/env bash
# Build kube-apiserver from the Kubernetes Go modules for kubeos's test cluster (tests/cluster), cached
# outside the repository.
#
# The Go module in tools/kube-apiserver/ requires k8s.io/kubernetes at a fixed release and replaces every
# k8s.io/* staging module with its matching v0.Y.Z; its main.go runs the API server's own cobra command.
# The binary goes to  $KUBEOS_KUBE_CACHE/<version>/kube-apiserver  and the Go module cache and build cache
# live next to it ($KUBEOS_KUBE_CACHE/go/), so a rebuild after a version bump is cheap. When the binary is
# there and answers --version with the pinned version, nothing is built (about 0.1 s).
#
# Usage:  scripts/build-kube-apiserver.sh            build if needed; prints the binary's path on stdout
#         scripts/build-kube-apiserver.sh --check    exit 0 when the cached binary is usable, 1 when not
#
# Progress lines go to stderr, so  BIN=$(scripts/build-kube-apiserver.sh)  works.
#
# Environment:
#   KUBEOS_KUBE_CACHE   cache root (default /var/cache/kubeos/kube-apiserver)
#   KUBEOS_KUBE_FORCE=1 rebuild even when a usable binary is cached
#   KUBEOS_GO           the go command (default: go on PATH); needs Go >= 1.26 (k8s.io/kubernetes v1.37 needs it)
#   KUBEOS_GO_PARALLEL  go build -p (default 2: the machines here have 2 cores)
#
# Network: only the Go module proxy (GOPROXY as configured, default proxy.golang.org). The checksum
# database is not consulted (GOSUMDB=off): every module is checked against the committed go.sum instead,
# and -mod=readonly refuses anything go.sum does not list.
set -euo pipefail

KUBE_VERSION=v1.37.2 # keep in step with tools/kube-apiserver/go.mod (require + every replace)

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
SRC="$ROOT/tools/kube-apiserver"
CACHE="${KUBEOS_KUBE_CACHE:-/var/cache/kubeos/kube-apiserver}"
OUT_DIR="$CACHE/$KUBE_VERSION"
BIN="$OUT_DIR/kube-apiserver"
# Go from the machine image lives in /usr/local/go/bin, which a bare CI environment may lack on PATH.
GO="${KUBEOS_GO:-$(command -v go || echo /usr/local/go/bin/go)}"
PARALLEL="${KUBEOS_GO_PARALLEL:-2}"

start_us=${EPOCHREALTIME/./}
step() {
    local us=$((${EPOCHREALTIME/./} - start_us))
    printf 'build-kube-apiserver: [%4d.%ds] %s\n' $((us / 1000000)) $((us % 1000000 / 100000)) "$*" >&2
}
die() {
    printf 'build-kube-apiserver: ERROR: %s\n' "$*" >&2
    exit 1
}

# The binary is usable when it runs and reports exactly the pinned version ("Kubernetes v1.37.2").
usable() {
    [[ -x "$BIN" ]] || return 1
    local reported
    reported=$(timeout 30 "$BIN" --version 2>/dev/null) || return 1
    [[ "$reported" == "Kubernetes $KUBE_VERSION" ]]
}

if [[ "${1:-}" == "--check" ]]; then
    usable
    exit
fi
[[ $# -eq 0 ]] || die "unknown argument: $1 (usage: $0 [--check])"

if [[ "${KUBEOS_KUBE_FORCE:-0}" != 1 ]] && usable; then
    step "cached: $BIN ($KUBE_VERSION)"
    printf '%s\n' "$BIN"
    exit 0
fi

# --- preflight ------------------------------------------------------------------------------------------------
step "checking the Go toolchain and tools/kube-apiserver/go.mod"
command -v "$GO" >/dev/null || die "'$GO' not found: install Go >= 1.26 (or set KUBEOS_GO)"
go_version=$("$GO" env GOVERSION) || die "'$GO env GOVERSION' failed"
[[ "$go_version" =~ ^go1\.([0-9]+) ]] || die "cannot parse the Go version '$go_version'"
((BASH_REMATCH[1] >= 26)) || die "$go_version is too old: k8s.io/kubernetes $KUBE_VERSION needs Go >= 1.26"
[[ -f "$SRC/go.mod" && -f "$SRC/go.sum" && -f "$SRC/main.go" ]] || die "$SRC must hold go.mod, go.sum and main.go"
grep -qE "^\s*(require\s+)?k8s\.io/kubernetes ${KUBE_VERSION//./\\.}\$" "$SRC/go.mod" ||
    die "$SRC/go.mod does not require k8s.io/kubernetes $KUBE_VERSION (update both together)"
staging="v0.${KUBE_VERSION#v1.}"
if grep -E '^\s+k8s\.io/[^ ]+ => ' "$SRC/go.mod" | grep -vqE "=> k8s\.io/[^ ]+ ${staging//./\\.}\$"; then
    die "every staging replace in $SRC/go.mod must point at $staging"
fi
step "$go_version; k8s.io/kubernetes $KUBE_VERSION with staging modules at $staging"

mkdir -p -- "$OUT_DIR" "$CACHE/go"
# One build at a time per cache (parallel test runs share it); the second one finds the binary ready.
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
    step "another build holds $CACHE/.build.lock: waiting"
    flock 9
fi
if [[ "${KUBEOS_KUBE_FORCE:-0}" != 1 ]] && usable; then
    step "built meanwhile by another run: $BIN"
    printf '%s\n' "$BIN"
    exit 0
fi

export GOPATH="$CACHE/go/path"
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOSUMDB=off GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
export GOPROXY="${GOPROXY:-$("$GO" env GOPROXY)}"

# --- download -------------------------------------------------------------------------------------------------
step "downloading modules into $GOMODCACHE (cached after the first run)"
"$GO" -C "$SRC" mod download || die "go mod download failed (is the Go module proxy $GOPROXY reachable?)"
"$GO" -C "$SRC" mod verify >/dev/null || die "go mod verify failed: the module cache does not match go.sum"
step "modules verified against go.sum"
# Every staging module k8s.io/kubernetes replaces with ./staging/... must be replaced here too (a new release
# may add one: go would then look for its v0.0.0, which does not exist).
kube_mod=$("$GO" -C "$SRC" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
[[ -f "$kube_mod" ]] || die "cannot find the go.mod of k8s.io/kubernetes $KUBE_VERSION in the module cache"
missing=()
for module in $(sed -n 's|^\s*\(k8s\.io/[^ ]*\) => \./staging/.*|\1|p' "$kube_mod"); do
    grep -qE "^\s+${module//./\\.} => ${module//./\\.} ${staging//./\\.}\$" "$SRC/go.mod" || missing+=("$module")
done
((${#missing[@]} == 0)) || die "tools/kube-apiserver/go.mod lacks 'replace M => M $staging' for: ${missing[*]}"
step "all staging modules of k8s.io/kubernetes $KUBE_VERSION are replaced by their $staging release"

# --- build ----------------------------------------------------------------------------------------------------
pkg=k8s.io/component-base/version
cpkg=k8s.io/client-go/pkg/version
minor=${KUBE_VERSION#v1.}
minor=${minor%%.*}
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for p in "$pkg" "$cpkg"; do
    ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    # No git here (modules come as zips): gitCommit is left empty rather than the "$Format:%H$" placeholder.
    ldflags+=" -X $p.gitCommit= -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
done
tmp="$OUT_DIR/.kube-apiserver.$$"
trap 'rm -f -- "$tmp"' EXIT
step "go build -p $PARALLEL (CGO_ENABLED=0, -trimpath, stripped); the first build takes a long while"
"$GO" -C "$SRC" build -p "$PARALLEL" -trimpath -ldflags "$ldflags" -o "$tmp" . ||
    die "go build failed (command: cd $SRC && go build -p $PARALLEL -trimpath -ldflags '$ldflags' .)"
mv -f -- "$tmp" "$BIN"

# --- check ----------------------------------------------------------------------------------------------------
usable || die "$BIN was built but '$BIN --version' does not print 'Kubernetes $KUBE_VERSION'"
size=$(du -h -- "$BIN" | cut -f1)
step "built $BIN ($size, $("$BIN" --version))"
printf '%s\n' "$BIN"
