#!/bin/sh
# kubeos boot-test OS: /sbin/init of a slot (busybox ash, PID 1 after the initramfs' switch_root).
#
# Prints exactly one line
#   KUBEOS-TEST booted slot=A version=v1 boot=N root=/dev/vda3 partuuid=<uuid> check=ok cmdline=<…>
# where slot comes from kubeos.slot= on the command line and is cross-checked against the mounted root:
# its PARTUUID (read from the GPT, see common.sh) must be the root=PARTUUID= of the command line and
# its GPT partition name must be ROOT-<slot>. When they disagree the line says slot=?<slot> and
# check=<what disagreed>. N counts the boots of this disk: /persist/test/boots gets one line per boot.
#
# Then it performs the actions queued in /persist/test/actions (written by the test while the VM is
# off), one per line, consuming each line before acting on it, until one ends the boot:
#   poweroff            power off (also what happens when no action is left)
#   reboot              reboot at once
#   fail-health         print "KUBEOS-TEST health-check failed …" and power off
#   panic               make the kernel panic (sysrq c); panic=N on the command line reboots
#   write NAME CONTENT  write CONTENT and a newline to NAME, sync, print "KUBEOS-TEST wrote name=NAME"
#   cat NAME            print "KUBEOS-TEST cat name=NAME size=BYTES content=…" (backslash and newline
#                       escaped as \\ and \n) or "KUBEOS-TEST cat name=NAME missing=yes"
#   sleep SECONDS       wait
# NAME is relative to /persist, or an absolute path under /etc (the overlay on PERSIST) or /persist.
# The lines after a terminal action stay queued for the next boot.
#
# An image built as broken (/etc/kubeos-test/broken) prints its booted line, then
# "KUBEOS-TEST init-failed slot=… version=… reason=broken-image …", and exits: the kernel panics
# ("Attempted to kill init"), and panic=N on the command line reboots the machine.

PATH=/bin:/sbin
export PATH
. /lib/kubeos-test/common.sh

[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/class ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
# Keep kernel messages (below emergencies) off the console so that our lines stay whole.
dmesg -n 1

VERSION_ID=unknown
. /usr/lib/os-release
version=$VERSION_ID
slot=$(kt_arg kubeos.slot)
root=$(kt_arg root)

# The mounted root: device number from mountinfo, then the kernel's name for it.
majmin=$(awk '$5 == "/" { d = $3 } END { print d }' /proc/self/mountinfo)
rootdev=$(sed -n 's/^DEVNAME=//p' "/sys/dev/block/$majmin/uevent" 2>/dev/null)
check=ok
if [ -z "$rootdev" ]; then
    check="no-root-device($majmin)"
    partuuid=unknown
else
    kt_partuuid "$rootdev" || kt_uuid=unknown
    partuuid=$kt_uuid
    partname=$(kt_partname "$rootdev")
    if [ "$(kt_lower "$root")" != "partuuid=$partuuid" ]; then
        check="root-mismatch(cmdline:$root,mounted:$partuuid)"
    elif [ "$partname" != "ROOT-$slot" ]; then
        check="slot-mismatch(cmdline:$slot,partition:$partname)"
    fi
fi
shown_slot=$slot
[ "$check" = ok ] || shown_slot="?$slot"

boots=0
if mkdir -p /persist/test 2>/dev/null; then
    [ -f /persist/test/boots ] && boots=$(wc -l </persist/test/boots)
    boots=$((boots + 1))
    echo "$boots slot=$slot version=$version partuuid=$partuuid" >>/persist/test/boots
    sync
fi

kt_say "booted slot=$shown_slot version=$version boot=$boots root=/dev/${rootdev:-unknown}" \
    "partuuid=$partuuid check=$check cmdline=$(cat /proc/cmdline)"

if [ -e /etc/kubeos-test/broken ]; then
    kt_say "init-failed slot=$slot version=$version reason=broken-image (init exits on purpose: the kernel panics)"
    sync
    exit 1
fi

ACTIONS=/persist/test/actions

# Resolve NAME for write/cat into a path; empty when refused.
target() {
    case "$1" in
        *..*) echo "" ;;
        /etc/* | /persist/*) echo "$1" ;;
        /*) echo "" ;;
        *) echo "/persist/$1" ;;
    esac
}

finish() {
    sync
    case "$1" in
        reboot) reboot -f ;;
        *) poweroff -f ;;
    esac
    sleep 10
    exit 1
}

while :; do
    line=""
    if [ -s "$ACTIONS" ]; then
        line=$(head -n 1 "$ACTIONS")
        tail -n +2 "$ACTIONS" >"$ACTIONS.new" && mv "$ACTIONS.new" "$ACTIONS"
        sync
    else
        line=poweroff
    fi
    set -f
    # shellcheck disable=SC2086
    set -- $line
    set +f
    verb=${1:-}
    name=${2:-}
    case "$line" in
        *" "*" "*) content=${line#* }; content=${content#* } ;;
        *) content="" ;;
    esac
    case "$verb" in
        "" | "#"*) ;;
        poweroff)
            kt_say "action poweroff"
            finish poweroff
            ;;
        reboot)
            kt_say "action reboot"
            finish reboot
            ;;
        fail-health)
            kt_say "health-check failed slot=$slot version=$version"
            finish poweroff
            ;;
        panic)
            kt_say "action panic"
            sync
            echo c >/proc/sysrq-trigger
            sleep 10
            ;;
        write)
            path=$(target "$name")
            if [ -z "$path" ]; then
                kt_say "action-error write name=$name: not under /persist or /etc"
            elif mkdir -p "$(dirname "$path")" && printf '%s\n' "$content" >"$path" && sync; then
                kt_say "wrote name=$name"
            else
                kt_say "action-error write name=$name failed"
            fi
            ;;
        cat)
            path=$(target "$name")
            if [ -n "$path" ] && [ -f "$path" ]; then
                size=$(wc -c <"$path")
                text=$(awk '{ gsub(/\\/, "\\\\"); printf "%s%s", (NR > 1 ? "\\n" : ""), $0 }' "$path")
                kt_say "cat name=$name size=$size content=$text"
            else
                kt_say "cat name=$name missing=yes"
            fi
            ;;
        sleep)
            sleep "${name:-1}"
            ;;
        *)
            kt_say "action-error unknown action: $line"
            ;;
    esac
done
