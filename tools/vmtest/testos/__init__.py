"""The kubeos boot-test OS builder (build.py) and the scripts it puts into the initramfs and root trees."""
