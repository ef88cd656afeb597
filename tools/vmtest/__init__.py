"""QEMU boots of kubeos disk images and the small test OS they boot (used by tests/boot and the demo)."""
