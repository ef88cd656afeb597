"""The kubeos node OS for VM tests: Debian bookworm with systemd, python3, the agent and the collection.

``build.py`` builds it with debootstrap and caches it; ``rootfs/`` holds the files it adds (agent
configuration, the health unit, the test driver); ``vm.py`` boots a node disk in QEMU and reads the
driver's ``KUBEOS-NODE`` console lines.
"""
