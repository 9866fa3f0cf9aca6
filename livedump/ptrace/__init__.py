"""No monitor: QEMU frozen with ptrace, its RAM map and vCPUs read through its DWARF."""
