"""Checks on a guest that counts in its memory (vm.COUNTING_PC): it runs on."""

import time

from .firmware import COUNTER_FIRST
from .vm import VM


def counter(vm: VM) -> int:
    """The guest's count, read from its memory through the monitor."""
    text = vm.command("human-monitor-command", **{"command-line": f"xp /1wx {COUNTER_FIRST:#x}"})
    assert isinstance(text, str)
    return int(text.split(":")[1], 16)


def assert_counts(vm: VM, seconds: float = 10) -> None:
    """The VM is running and its guest still writes its memory."""
    assert vm.status() == "running"
    first, deadline = counter(vm), time.monotonic() + seconds
    while counter(vm) == first:
        assert time.monotonic() < deadline, "the guest stopped counting"
        time.sleep(0.05)
