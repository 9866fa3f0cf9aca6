"""Guest RAM searched for VMCOREINFO page starts, in this process's own memory
standing in for QEMU's: by process_vm_readv, and by /proc/PID/mem where the
system call is not allowed."""

import os

import pytest

from livedump.guest import memory as guest_memory
from livedump.guest.memory import GuestMemory, SeveralKernels, find_vmcoreinfo
from livedump.transfer.memory import Buffer, ProcessMemory
from livedump.vmcore.arch import lookup
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
def test_pages_starting_with_osrelease_are_found(ram, syscall):
    with ProcessMemory(os.getpid()) as memory:
        memory._use_syscall = syscall
        guest = GuestMemory(memory, [Block(0x100000, 8 << 20, ram.address)])
        found = list(guest_memory._pages(guest))
    assert [gpa for gpa, _ in found] == [0x100000 + p * PAGE for p in (3, 1024, 2047)]
    assert all(page.startswith(b"OSRELEASE=6.1.0\n") and len(page) == PAGE
               for _, page in found)


def test_two_arm64_kernels_are_not_told_apart_by_a_pause():
    """A warm reboot's two VMCOREINFO pages, each with its release where it says:
    on arm64 no CPU state says which kernel runs, and the error does not ask
    for a pause that cannot help."""
    buf = Buffer(4 << 20)
    for page, image in ((1, 0x100000), (2, 0x200000)):
        text = (f"OSRELEASE=6.1.0\nPAGESIZE=4096\nSYMBOL(init_uts_ns)="
                f"{0xFFFF800008000000 + image:x}\nOFFSET(uts_namespace.name)=0\n"
                "NUMBER(kimage_voffset)=0xffff7fffc8000000\n").encode()
        buf.data[page * PAGE : page * PAGE + len(text)] = text
        buf.data[image + 130 : image + 136] = b"6.1.0\0"  # new_utsname.release
    with ProcessMemory(os.getpid()) as memory:
        guest = GuestMemory(memory, [Block(0x40000000, 4 << 20, buf.address)])
        with pytest.raises(SeveralKernels, match=r"^2 kernels' VMCOREINFO in guest memory "
                           r"\(GPA 0x40001000, 0x40002000\), as after a reboot; which one "
                           r"runs cannot be told on aarch64-le$"):
            find_vmcoreinfo(guest, lookup("aarch64-le"))
