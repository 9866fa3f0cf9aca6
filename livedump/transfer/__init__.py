"""Moving the bytes: QEMU's memory, the copy, and the output file."""
