"""Guest-physical memory read straight from QEMU's process, and the guest
kernel's VMCOREINFO found in it, with no vmcore written.

The search is the dump's (:mod:`livedump.vmcore.vmcoreinfo`), over memory
read for it alone: pages that start with ``OSRELEASE=`` and hold one whole
well-formed VMCOREINFO, whose ``init_uts_ns`` holds the release it names.
Only pages the process ever populated are read where the page map can
tell (private anonymous RAM): a page never touched holds no kernel.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from livedump.errors import GuestKernelError
from livedump.transfer.memory import DATA, Buffer, PageMap, ProcessMemory
from livedump.vmcore.arch import EM_X86_64, Arch
from livedump.vmcore.blocks import Block
from livedump.vmcore.vmcoreinfo import (
    MAGIC,
    SCAN_ALIGN,
    Invalid,
    check_release,
    kernel_phys,
    number,
    page_text,
    parse,
    x86_64_translate,
)

_CHUNK = 4 << 20  # bytes read at a time while searching
_PTI_USER_BIT = 1 << 12  # as in vmcoreinfo: CR3 may name the user half of a PTI pair


class GuestMemory:
    """Guest-physical addresses read through the VM's RAM map from QEMU's memory."""

    def __init__(self, memory: ProcessMemory, blocks: list[Block]) -> None:
        self.memory = memory
        self.blocks = blocks
        self._buffer = Buffer(1 << 20)

    def read(self, gpa: int, length: int) -> bytes | None:
        """``length`` bytes at ``gpa``; None unless all of them are in one RAM block."""
        for b in self.blocks:
            if b.gpa <= gpa and gpa + length <= b.end:
                if length > len(self._buffer.data):
                    self._buffer = Buffer(-(-length // SCAN_ALIGN) * SCAN_ALIGN)
                return bytes(self.memory.read(self._buffer, length, b.hva + gpa - b.gpa))
        return None


class SeveralKernels(GuestKernelError):
    """More than one kernel's VMCOREINFO passes every check, and nothing told
    which one runs."""


@dataclass(frozen=True)
class Found:
    """The running kernel's VMCOREINFO: where, and its entries."""

    gpa: int
    entries: dict[str, str]


def find_vmcoreinfo(guest: GuestMemory, pagemap: PageMap | None, private: list[bool],
                    arch: Arch, roots: list[int] | None = None) -> Found:
    """The guest kernel's VMCOREINFO, searched in all of guest RAM.

    Several that pass every check (a warm reboot leaves the earlier kernel's
    intact) are told apart by the page tables the vCPUs run on, ``roots``
    (their CR3s) where known; else GuestKernelError asks for a paused read.
    """
    candidates: dict[bytes, int] = {}
    rejected: list[str] = []
    for gpa, rest in _pages(guest, pagemap, private):
        try:
            text = page_text(gpa, rest, len(rest))
        except Invalid as e:
            rejected.append(f"{gpa:#x}: {e}")
            continue
        candidates.setdefault(text, gpa)
    valid: list[Found] = []
    for text, gpa in candidates.items():
        entries = parse(text)
        try:
            check_release(entries, arch, guest.read)
        except Invalid as e:
            rejected.append(f"{gpa:#x}: {e}")
            continue
        valid.append(Found(gpa, entries))
    if len(valid) > 1 and roots:
        valid = [f for f in valid if runs(f.entries, arch, roots, guest)]
    if not valid:
        why = f" (rejected: {'; '.join(rejected[:3])})" if rejected else ""
        raise GuestKernelError("no VMCOREINFO in guest memory: not a booted Linux guest?"
                               + why)
    if len(valid) > 1:
        where = ", ".join(f"{f.gpa:#x}" for f in valid)
        several = f"{len(valid)} kernels' VMCOREINFO in guest memory (GPA {where})"
        if roots:
            raise SeveralKernels(f"{several}, and the vCPUs' page tables map each of them")
        if arch.machine != EM_X86_64:  # Only x86's CPU state gives its page tables here.
            raise SeveralKernels(f"{several}, as after a reboot; which one runs cannot be "
                                 f"told on {arch.name}")
        raise SeveralKernels(f"{several}, as after a reboot; with --pause the vCPUs' page "
                             "tables tell which kernel runs")
    return valid[0]


def runs(entries: dict[str, str], arch: Arch, roots: list[int], guest: GuestMemory) -> bool:
    """Whether the page tables some vCPU runs on map this kernel's init_uts_ns
    where its VMCOREINFO says."""
    va = number(entries["SYMBOL(init_uts_ns)"], "SYMBOL(init_uts_ns)", base=16)
    pa = kernel_phys(entries, arch, va)
    levels = 5 if entries.get("NUMBER(pgtable_l5_enabled)") == "1" else 4
    return any(x86_64_translate(root, va, levels, guest.read) == pa
               for cr3 in roots for root in (cr3, cr3 & ~_PTI_USER_BIT))


def _pages(guest: GuestMemory, pagemap: PageMap | None,
           private: list[bool]) -> Iterator[tuple[int, bytes]]:
    """``(gpa, page)`` for each page of guest RAM that starts with ``OSRELEASE=``."""
    buffer = Buffer(_CHUNK)
    for block, only_populated in zip(guest.blocks, private, strict=True):
        if pagemap is not None and only_populated:
            runs = [(o, n) for o, n, kind in pagemap.extents(block.hva, block.size)
                    if kind == DATA]
        else:
            runs = [(0, block.size)]
        for offset, size in runs:
            for at in range(offset, offset + size, _CHUNK):
                n = min(_CHUNK, offset + size - at)
                data = guest.memory.read(buffer, n, block.hva + at)
                gpa = block.gpa + at
                first = -gpa % SCAN_ALIGN
                starts = bytes(data[first:n:SCAN_ALIGN])
                page = starts.find(MAGIC[0])
                while page >= 0:
                    where = first + page * SCAN_ALIGN
                    if data[where : where + len(MAGIC)] == MAGIC:
                        yield gpa + where, bytes(data[where : where + SCAN_ALIGN])
                    page = starts.find(MAGIC[0], page + 1)
