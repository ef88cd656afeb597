#!/bin/sh
# kubeos boot-test OS: the initramfs /init (busybox ash, PID 1).
#
# 1. mounts proc, sys, devtmpfs and loads the kernel modules listed in /lib/modules/load-order
#    (virtio_pci, virtio_blk, ext4, overlay and their dependencies, resolved at build time);
# 2. finds the root from root=PARTUUID=<uuid> on the kernel command line by reading each partition's
#    GPT entry (see common.sh); only when that fails, by the filesystem label ROOT-<kubeos.slot>
#    (busybox findfs); root=LABEL=… and root=/dev/… are accepted as well;
# 3. mounts it read-only, mounts PERSIST (filesystem label) read-write and overlays /etc with
#    /persist/etc-overlay/{upper,work} (created on first boot);
# 4. moves the mounts into the new root and switch_root's into its /sbin/init.
# Any failure prints "KUBEOS-TEST initramfs-error …" and exits: PID 1 exiting makes the kernel panic,
# so panic=N reboots the machine and GRUB counts the boot as a failed try.

PATH=/bin
export PATH
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /mnt/root /mnt/persist
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

. /lib/kubeos-test/common.sh

fail() {
    kt_say "initramfs-error $*"
    sync
    exit 1
}

kver=$(uname -r)
while read -r mod flag; do
    [ -n "$mod" ] || continue
    if ! insmod "/lib/modules/$kver/$mod" 2>/dev/null && [ "$flag" != optional ]; then
        fail "cannot load kernel module $mod"
    fi
done </lib/modules/load-order

root=$(kt_arg root)
slot=$(kt_arg kubeos.slot)
dev=""
how=""
tries=0
while [ -z "$dev" ] && [ "$tries" -lt 50 ]; do
    case "$root" in
        PARTUUID=*)
            if kt_find_partuuid "${root#PARTUUID=}"; then
                dev=$kt_dev
                how="partuuid-$kt_how"
            fi
            ;;
        LABEL=*)
            dev=$(findfs "$root" 2>/dev/null) && how=label
            ;;
        /dev/*)
            [ -b "$root" ] && dev=$root && how=device
            ;;
    esac
    if [ -z "$dev" ] && [ "$tries" -ge 20 ] && [ -n "$slot" ]; then
        dev=$(findfs "LABEL=ROOT-$slot" 2>/dev/null) && how="label-fallback"
    fi
    [ -n "$dev" ] || { tries=$((tries + 1)); sleep 0.1; }
done
[ -n "$dev" ] || fail "root $root (slot ${slot:-?}) not found"

mount -t ext4 -o ro "$dev" /mnt/root || fail "cannot mount root $dev read-only"
[ -x /mnt/root/sbin/init ] || [ -L /mnt/root/sbin/init ] || fail "root $dev has no /sbin/init"

persist=$(findfs LABEL=PERSIST 2>/dev/null)
if [ -n "$persist" ] && mount -t ext4 -o rw,noatime "$persist" /mnt/persist; then
    mkdir -p /mnt/persist/etc-overlay/upper /mnt/persist/etc-overlay/work
    mount -t overlay overlay \
        -o lowerdir=/mnt/root/etc,upperdir=/mnt/persist/etc-overlay/upper,workdir=/mnt/persist/etc-overlay/work \
        /mnt/root/etc || fail "cannot overlay /etc from PERSIST $persist"
    mount --move /mnt/persist /mnt/root/persist || fail "cannot move PERSIST into the root"
else
    persist="none"
fi

kt_say "initramfs root=$dev found-by=$how persist=$persist"

mount --move /dev /mnt/root/dev
mount --move /sys /mnt/root/sys
mount --move /proc /mnt/root/proc
exec switch_root /mnt/root /sbin/init
