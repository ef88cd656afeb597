"""Boot tests: disk images laid out by the kubeos.os collection, booted under QEMU with OVMF."""
