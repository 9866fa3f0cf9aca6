"""A libvirt domain: found, paused and mapped through libvirt."""
