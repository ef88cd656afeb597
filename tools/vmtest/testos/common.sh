# kubeos boot-test OS: shell helpers shared by the initramfs /init and the slots' /sbin/init.
# Sourced by busybox ash. Every line meant for the test harness starts with "KUBEOS-TEST ".
#
# PARTUUID resolution: the kernel has no userspace interface for a partition's GPT unique GUID in
# every version (the Debian 6.1 kernel does not put PARTUUID= into the partition's uevent), and
# busybox has no blkid. So the GUID is read from the GPT itself: the partition's number comes from
# /sys/class/block/NAME/partition, the sector size from the disk's queue, the entry array's LBA
# and entry size from the primary GPT header at LBA 1, and the unique GUID is bytes 16..31 of the
# entry (mixed-endian, as in the UEFI specification). A kernel that does publish PARTUUID= in the
# uevent is believed first.

kt_say() {
    echo "KUBEOS-TEST $*"
}

# The value of the last NAME=VALUE argument on the kernel command line (empty when absent).
kt_arg() {
    kt_value=""
    for kt_word in $(cat /proc/cmdline); do
        case "$kt_word" in
            "$1"=*) kt_value="${kt_word#*=}" ;;
        esac
    done
    echo "$kt_value"
}

kt_lower() {
    echo "$1" | tr 'A-Z' 'a-z'
}

# Sets kt_disk (e.g. vda) and kt_off, the byte offset of partition NAME's entry in the primary GPT.
kt_gpt_entry() {
    kt_n=$(cat "/sys/class/block/$1/partition" 2>/dev/null) || return 1
    kt_disk=$(readlink -f "/sys/class/block/$1/..")
    kt_disk=${kt_disk##*/}
    kt_ss=$(cat "/sys/class/block/$kt_disk/queue/logical_block_size" 2>/dev/null) || kt_ss=512
    [ "$(dd if="/dev/$kt_disk" bs=1 skip="$kt_ss" count=8 2>/dev/null)" = "EFI PART" ] || return 1
    kt_lba=$(od -An -tu8 -j $((kt_ss + 72)) -N 8 "/dev/$kt_disk" | tr -d ' ')
    kt_esz=$(od -An -tu4 -j $((kt_ss + 84)) -N 4 "/dev/$kt_disk" | tr -d ' ')
    kt_off=$((kt_lba * kt_ss + (kt_n - 1) * kt_esz))
}

# The GPT unique partition GUID of partition NAME (e.g. vda3): bytes 16..31 of its entry.
kt_gpt_partuuid() {
    kt_gpt_entry "$1" || return 1
    # shellcheck disable=SC2046
    set -- $(od -An -v -tx1 -j $((kt_off + 16)) -N 16 "/dev/$kt_disk")
    [ $# -eq 16 ] || return 1
    echo "$4$3$2$1-$6$5-$8$7-$9${10}-${11}${12}${13}${14}${15}${16}"
}

# The GPT partition name of partition NAME: bytes 56..127 of its entry, UTF-16LE (ASCII names only).
kt_gpt_partname() {
    kt_gpt_entry "$1" || return 1
    dd if="/dev/$kt_disk" bs=1 skip=$((kt_off + 56)) count=72 2>/dev/null | tr -d '\000'
}

# Sets kt_uuid to the PARTUUID of partition NAME (lower case) and kt_how to "uevent" or "gpt".
kt_partuuid() {
    kt_how=uevent
    kt_uuid=$(sed -n 's/^PARTUUID=//p' "/sys/class/block/$1/uevent" 2>/dev/null)
    if [ -z "$kt_uuid" ]; then
        kt_how=gpt
        kt_uuid=$(kt_gpt_partuuid "$1") || return 1
    fi
    kt_uuid=$(kt_lower "$kt_uuid")
}

# The GPT partition name (PARTLABEL) of partition NAME: the kernel's uevent, else the GPT itself.
kt_partname() {
    kt_pn=$(sed -n 's/^PARTNAME=//p' "/sys/class/block/$1/uevent" 2>/dev/null)
    [ -n "$kt_pn" ] || kt_pn=$(kt_gpt_partname "$1")
    echo "$kt_pn"
}

# Sets kt_dev to /dev/NAME of the partition whose PARTUUID is $1 (any case), and kt_how.
kt_find_partuuid() {
    kt_want=$(kt_lower "$1")
    for kt_p in /sys/class/block/*; do
        [ -e "$kt_p/partition" ] || continue
        kt_partuuid "${kt_p##*/}" || continue
        if [ "$kt_uuid" = "$kt_want" ]; then
            kt_dev="/dev/${kt_p##*/}"
            return 0
        fi
    done
    return 1
}
