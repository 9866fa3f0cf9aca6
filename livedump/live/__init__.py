"""``--live``: guest memory from QEMU's background snapshot."""
