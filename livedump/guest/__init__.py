"""What livedump knows of the guest's kernel, by subsystem, from VMCOREINFO alone."""
