"""livedump: write the guest memory of a running QEMU as an ELF vmcore."""

__version__ = "0.1.0"
