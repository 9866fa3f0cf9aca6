"""The vmcore itself: ELF layout, architectures, blocks, notes and VMCOREINFO."""
