"""Guest-physical memory read straight from QEMU's process, and the guest
kernel's VMCOREINFO found in it, with no vmcore written.

The search is the dump's (:mod:`livedump.vmcore.vmcoreinfo`), over memory
read for it alone: pages that start with ``OSRELEASE=`` and hold one whole
well-formed VMCOREINFO, whose ``init_uts_ns`` holds the release it names.
Memory is read as the dump's copy reads it
(:func:`~livedump.transfer.copier.extents`): pages that hold nothing (never
populated, the zero page, holes in the file behind shared RAM) are not read,
and shared RAM QEMU has not mapped is read from its file, so neither the
search nor the log's reads create a page in QEMU.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from livedump.errors import GuestKernelError
from livedump.transfer.copier import CHUNK
from livedump.transfer.kdump_copy import guest_reader, pieces
from livedump.transfer.memory import DATA, Buffer, MemorySource, Populated, Span
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

_PTI_USER_BIT = 1 << 12  # as in vmcoreinfo: CR3 may name the user half of a PTI pair


class _AllData:
    """A page map that knows nothing: every page is read (through QEMU)."""

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, int]]:
        yield 0, size, DATA


class GuestMemory:
    """Guest-physical addresses read through the VM's RAM map from QEMU's memory,
    as a dump reads them: ``spans[i]`` are block ``i``'s parts
    (:meth:`BackingFiles.spans <livedump.transfer.memory.BackingFiles.spans>`),
    ``pagemap`` says which pages hold data. Without them every page is read
    through QEMU."""

    def __init__(self, memory: MemorySource, blocks: list[Block],
                 spans: Sequence[Sequence[Span]] | None = None,
                 pagemap: Populated | None = None) -> None:
        self.memory = memory
        self.blocks = blocks
        self.spans = (list(spans) if spans is not None
                      else [[Span(0, b.size, False)] for b in blocks])
        self.pagemap: Populated = pagemap if pagemap is not None else _AllData()
        self._read = guest_reader(memory, blocks, self.spans, self.pagemap)

    def read(self, gpa: int, length: int) -> bytes | None:
        """``length`` bytes at ``gpa`` (zeros where nothing is); None unless all of
        them are in one RAM block."""
        return self._read(gpa, length)


class SeveralKernels(GuestKernelError):
    """More than one kernel's VMCOREINFO passes every check, and nothing told
    which one runs."""


@dataclass(frozen=True)
class Found:
    """The running kernel's VMCOREINFO: where, and its entries."""

    gpa: int
    entries: dict[str, str]


def find_vmcoreinfo(guest: GuestMemory, arch: Arch, roots: list[int] | None = None) -> Found:
    """The guest kernel's VMCOREINFO, searched in all of guest RAM.

    Several that pass every check (a warm reboot leaves the earlier kernel's
    intact) are told apart by the page tables the vCPUs run on, ``roots``
    (their CR3s) where known; else GuestKernelError asks for a paused read.
    """
    candidates: dict[bytes, int] = {}
    rejected: list[str] = []
    for gpa, rest in _pages(guest):
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


def _pages(guest: GuestMemory) -> Iterator[tuple[int, bytes]]:
    """``(gpa, page)`` for each page of guest RAM that starts with ``OSRELEASE=``."""
    buffer = Buffer(CHUNK)
    for gpa, n, source in pieces(guest.blocks, guest.spans, guest.pagemap):
        if source is None:
            continue  # nothing there
        data = source.read(guest.memory, buffer, n)
        first = -gpa % SCAN_ALIGN
        starts = bytes(data[first:n:SCAN_ALIGN])
        page = starts.find(MAGIC[0])
        while page >= 0:
            where = first + page * SCAN_ALIGN
            if data[where : where + len(MAGIC)] == MAGIC:
                yield gpa + where, bytes(data[where : where + SCAN_ALIGN])
            page = starts.find(MAGIC[0], page + 1)
