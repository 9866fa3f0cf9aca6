"""Guest RAM searched for VMCOREINFO page starts, in this process's own memory
standing in for QEMU's: by process_vm_readv, and by /proc/PID/mem where the
system call is not allowed."""

import os

import pytest

from livedump.guest import memory as guest_memory
from livedump.guest.memory import GuestMemory
from livedump.transfer.memory import Buffer, ProcessMemory
from livedump.vmcore.blocks import Block

PAGE = 4096


@pytest.fixture
def ram():
    """8 MiB of 'guest RAM' (two search chunks), VMCOREINFO-like pages at known places."""
    buf = Buffer(8 << 20)
    for page in (3, 1024, 2047):
        buf.data[page * PAGE : page * PAGE + 16] = b"OSRELEASE=6.1.0\n"
    buf.data[5 * PAGE + 1 : 5 * PAGE + 11] = b"OSRELEASE="  # not at a page start
    buf.data[7 * PAGE : 7 * PAGE + 9] = b"OSRELEASX"  # not the magic
    return buf


@pytest.mark.parametrize("syscall", [True, False], ids=["process_vm_readv", "proc-mem"])
def test_pages_starting_with_osrelease_are_found(ram, syscall, monkeypatch):
    monkeypatch.setattr(guest_memory, "_CHUNK", 4 << 20)
    with ProcessMemory(os.getpid()) as memory:
        memory._use_syscall = syscall
        guest = GuestMemory(memory, [Block(0x100000, 8 << 20, ram.address)])
        found = list(guest_memory._pages(guest, None, [False]))
    assert [gpa for gpa, _ in found] == [0x100000 + p * PAGE for p in (3, 1024, 2047)]
    assert all(page.startswith(b"OSRELEASE=6.1.0\n") and len(page) == PAGE
               for _, page in found)
