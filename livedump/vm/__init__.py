"""Find the VM, hold it still, and make sure it is let go whatever happens."""
