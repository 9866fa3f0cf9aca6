"""QEMU's QMP monitor: the transport, the commands, and the RAM map it gives."""
