"""Checks on a guest that counts in its memory (vm.COUNTING_PC): it runs on."""

import time

from .firmware import COUNTER_FIRST
from .vm import VM


def counter(vm: VM) -> int:
    """The guest's count, read from its memory through the monitor."""
    text = vm.command("human-monitor-command", **{"command-line": f"xp /1wx {COUNTER_FIRST:#x}"})
    assert isinstance(text, str)
    return int(text.split(":")[1], 16)


def wait_nonzero(vm: VM, gpa: int, seconds: float = 30) -> None:
    """Wait until the running guest's counter at ``gpa`` is past 0: a starved
    vCPU may not have begun counting by the time the test goes on."""
    deadline = time.monotonic() + seconds
    while vm.read_u32(gpa) == 0:
        assert time.monotonic() < deadline, f"the guest never counted at {gpa:#x}"
        time.sleep(0.05)


def wait_counting(vm: VM, seconds: float = 30) -> None:
    """``wait_nonzero`` for the counting guest's (``vm.COUNTING_PC``) count."""
    wait_nonzero(vm, COUNTER_FIRST, seconds)


def assert_counts(vm: VM, seconds: float = 10) -> None:
    """The VM is running and its guest still writes its memory."""
    assert vm.status() == "running"
    first, deadline = counter(vm), time.monotonic() + seconds
    while counter(vm) == first:
        assert time.monotonic() < deadline, "the guest stopped counting"
        time.sleep(0.05)
