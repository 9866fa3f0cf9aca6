"""A guest vmcore out of the core file of a QEMU process that is gone."""
