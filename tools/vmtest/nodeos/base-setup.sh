#!/bin/sh
# kubeos node OS, base stage: runs INSIDE the debootstrap'ed Debian root (chroot, own mount and PID
# namespace, /proc /sys /dev mounted, apt's archive directory bound to the builder's package cache).
#
# Environment: KUBEOS_PACKAGES (Debian packages to install), KUBEOS_WHEELS (directory of wheels, inside
# the root), KUBEOS_REQUIREMENTS (file of Python requirements, inside the root).
#
# 1. no documentation, manual pages or translations (dpkg path excludes, then removal of what is there);
# 2. services are never started here (policy-rc.d);
# 3. the kernel: initramfs-tools with only the modules a virtio disk with ext4 needs (MODULES=list),
#    links /boot/vmlinuz and /boot/initrd.img; the kernel's modules trimmed to what the node uses;
# 4. the virtualenv /opt/kubeos/venv with the agent's Python dependencies, offline from the wheels;
# 5. clean up: apt lists, logs, caches.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "base-setup: $*"; }

cat >/etc/dpkg/dpkg.cfg.d/01-kubeos-nodoc <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/bash-completion/*
EOF
cat >/etc/apt/apt.conf.d/01-kubeos <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d

# initramfs-tools: before the kernel is installed, so that its postinst builds the small initramfs.
mkdir -p /etc/initramfs-tools/conf.d
cat >/etc/initramfs-tools/conf.d/kubeos.conf <<'EOF'
# kubeos node: only what a virtio disk with ext4 needs (root=PARTUUID= is resolved by udev).
MODULES=list
COMPRESS=gzip
EOF
cat >/etc/initramfs-tools/modules <<'EOF'
virtio_pci
virtio_blk
ext4
crc32c_generic
EOF
cat >/etc/kernel-img.conf <<'EOF'
do_symlinks = yes
link_in_boot = yes
EOF

say "apt-get update"
apt-get update -qq
say "apt-get install $KUBEOS_PACKAGES"
# shellcheck disable=SC2086
apt-get install -y -qq -o Dpkg::Use-Pty=0 $KUBEOS_PACKAGES >/tmp/apt-install.log 2>&1 || {
    cat /tmp/apt-install.log
    exit 1
}

kver=$(cd /lib/modules && ls | sort -V | tail -n 1)
say "kernel $kver"
[ -e "/boot/vmlinuz-$kver" ] || { echo "no /boot/vmlinuz-$kver" >&2; exit 1; }
[ -e "/boot/initrd.img-$kver" ] || update-initramfs -c -k "$kver"
ln -sfn "vmlinuz-$kver" /boot/vmlinuz
ln -sfn "initrd.img-$kver" /boot/initrd.img
rm -f /boot/vmlinuz.old /boot/initrd.img.old /vmlinuz /vmlinuz.old /initrd.img /initrd.img.old

# Kernel modules on the root: file systems, virtio, block (loop), crypto and library helpers. The rest
# (hundreds of MiB of drivers for real hardware) is of no use in this VM.
moddir=/lib/modules/$kver/kernel
keep="fs/ext4 fs/jbd2 fs/mbcache.ko fs/fat fs/nls fs/overlayfs drivers/block drivers/virtio drivers/char/hw_random crypto arch/x86/crypto lib"
mkdir /tmp/kept-modules
for rel in $keep; do
    if [ -e "$moddir/$rel" ]; then
        mkdir -p "/tmp/kept-modules/$(dirname "$rel")"
        mv "$moddir/$rel" "/tmp/kept-modules/$rel"
    fi
done
rm -rf "$moddir"
mv /tmp/kept-modules "$moddir"
depmod -a "$kver"

# udev's hardware database describes real hardware (keyboards, USB ids): nothing a VM test needs.
rm -rf /usr/lib/udev/hwdb.d /usr/lib/udev/hwdb.bin /etc/udev/hwdb.bin

say "python virtualenv /opt/kubeos/venv"
python3 -m venv /opt/kubeos/venv
/opt/kubeos/venv/bin/python -m pip install -q --no-index --disable-pip-version-check --no-cache-dir \
    --find-links "$KUBEOS_WHEELS" -r "$KUBEOS_REQUIREMENTS"
/opt/kubeos/venv/bin/python -m pip freeze --disable-pip-version-check >/opt/kubeos/base-requirements.txt
# Byte-compile everything now: the root is read-only at run time.
/opt/kubeos/venv/bin/python -m compileall -q -j 0 /opt/kubeos/venv/lib >/dev/null || true

dpkg-query -W -f='${Package} ${Version}\n' >/opt/kubeos/base-packages.txt

say "clean up"
rm -f /usr/sbin/policy-rc.d
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/lintian /usr/share/bash-completion
if [ -d /usr/share/locale ]; then
    find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
fi
find /var/log -type f -delete
rm -rf /tmp/* /var/tmp/* /root/.cache
: >/etc/resolv.conf
say "done"
