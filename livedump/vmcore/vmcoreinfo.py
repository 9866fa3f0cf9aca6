"""VMCOREINFO: the Linux guest's description of itself, which crash and drgn need.

A Linux kernel keeps, from boot, a page of ``KEY=VALUE`` lines
(``OSRELEASE=``, ``PAGESIZE=``, ``SYMBOL(init_uts_ns)=``, ``KERNELOFFSET=``...)
that tells a dump reader its release, KASLR offset and struct layouts. QEMU
carries it in a ``VMCOREINFO`` note only when the VM has ``-device
vmcoreinfo`` and the guest loaded ``qemu_fw_cfg``; without it drgn refuses
the vmcore. So when QEMU's notes lack it, livedump finds the page itself, in
the memory it streams anyway: no second pass over guest memory.

The header, notes included, is written before memory, and readers want the
notes before the first byte of memory. So room for the note is reserved
right after the notes, outside PT_NOTE: zeros that no reader looks at, as
the padding that aligns memory is. Once memory is written, the note is
written into the room of a file and PT_NOTE's size made to take it in.
Standard output cannot be rewritten: its room stays unused zeros (so a pipe
carries the bytes a file would without a find), nothing is looked for, and
the report says why. QEMU's own note needs no room.

A match is trusted only after strict checks, since a wrong VMCOREINFO makes
crash and drgn misread everything: the page holds nothing but well-formed
lines and zeros, has the keys readers rely on, and, where the architecture
says how kernel addresses map to physical ones, ``SYMBOL(init_uts_ns)``
must hold the very release ``OSRELEASE`` names (read back from the written
vmcore). A page left by an earlier kernel usually points at memory that no
longer holds its release; but a warm reboot leaves all of RAM as it was,
the earlier kernel's image included, and then both pages pass. The page
tables the vCPUs run on (CR3, from QEMU's x86 notes) then tell them apart:
only the running kernel's map its ``init_uts_ns`` where its page says.
Several different pages that pass still (no CPU notes, other targets):
none is written, and the report says so.
"""

import bisect
import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from livedump.vmcore.arch import EM_AARCH64, EM_PPC64, EM_X86_64, Arch
from livedump.vmcore.elf import CoreLayout, Note
from livedump.vmcore.notes import CpuNotes, QemuNotes
from livedump.vmcore.x86_notes import x86_page_tables

NAME = "VMCOREINFO"
NT_VMCOREINFO = 0  # the type the kernel gives its own VMCOREINFO note

# Pages are looked for at this alignment: the smallest page of any target,
# so a 64 KiB-page kernel's page (64 KiB-aligned) is found too.
SCAN_ALIGN = 4096
MAGIC = b"OSRELEASE="
# The text fills at most one guest page: room for the largest page a target
# may use, so the room never turns a valid find away.
_LARGEST_PAGE = {EM_AARCH64: 65536, EM_PPC64: 65536}
_REQUIRED = ("OSRELEASE", "PAGESIZE", "SYMBOL(init_uts_ns)")
_LINE = re.compile(rb"[A-Z][A-Z0-9_-]*(?:\([A-Za-z0-9_.]+\))?=[\x21-\x7e]+")
# Pages starting with OSRELEASE= looked at before giving up (a real guest has
# one, or a few after kexec), and reasons kept for the report.
_MAX_LOOKS = 64
_MAX_REASONS = 3
_NEW_UTS_LEN = 65  # struct new_utsname: sysname, nodename, release... of 65 bytes
_RELEASE_OFFSET = 2 * _NEW_UTS_LEN
_START_KERNEL_MAP = 0xFFFFFFFF80000000  # x86_64: kernel text mapping base
_PPC64_PAGE_OFFSET = 0xC000000000000000  # ppc64: the linear map, which holds the kernel
_U64 = (1 << 64) - 1
_PTE_PRESENT, _PTE_HUGE = 1, 1 << 7
_PTE_ADDRESS = 0x000F_FFFF_FFFF_F000
# With page-table isolation CR3 may point at the user half of an 8 KiB pair;
# the kernel's tables are the 4 KiB below.
_PTI_USER_BIT = 1 << 12

ReadPhys = Callable[[int, int], bytes | None]  # guest-physical address, length
Chunk = bytes | mmap.mmap  # bytes that slice, find and compare at C speed
# Shown each chunk of memory of which something was written: its file offset,
# and the first ``length`` bytes of a buffer. Called by one thread at a time,
# in no set order (readers finish in any order); a reader is meanwhile not
# reading, so it must be quick.
Inspect = Callable[[int, Chunk, int], None]


class VmcoreFile(Protocol):
    """The vmcore as written so far: read back, and its note slot patched."""

    def read_at(self, offset: int, length: int) -> bytes: ...
    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...


class Invalid(ValueError):
    """A candidate page that is not a usable VMCOREINFO."""


@dataclass(frozen=True)
class Result:
    """Where the vmcore's VMCOREINFO came from, for the report."""

    source: str  # "qemu" (its vmcoreinfo device), "guest" (found in memory) or "none"
    detail: str  # one phrase for the report line
    gpa: int | None = None
    release: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"source": self.source, "gpa": self.gpa, "release": self.release,
                "detail": self.detail}


def parse(text: bytes) -> dict[str, str]:
    """The entries of VMCOREINFO ``text`` (without its trailing NULs); Invalid if it is
    not made only of well-formed ``KEY=VALUE`` lines with the keys readers need."""
    if not text.endswith(b"\n"):
        raise Invalid("does not end with a newline")
    entries: dict[str, str] = {}
    for line in text[:-1].split(b"\n"):
        if not _LINE.fullmatch(line):
            raise Invalid(f"malformed line {line[:40]!r}")
        key, _, value = line.decode().partition("=")
        entries[key] = value  # a repeated key (CRASHTIME) counts as its last value
    missing = [k for k in _REQUIRED if k not in entries]
    if missing:
        raise Invalid(f"lacks {', '.join(missing)}")
    if not text.startswith(MAGIC):
        raise Invalid("does not begin with OSRELEASE")
    page = number(entries["PAGESIZE"], "PAGESIZE")
    if page < SCAN_ALIGN or page & (page - 1):
        raise Invalid(f"PAGESIZE {page} is not a page size")
    if len(text) >= page:
        raise Invalid("longer than its page")
    return entries


def page_text(gpa: int, rest: bytes, capacity: int) -> bytes:
    """The VMCOREINFO text of the page at ``gpa``, given ``rest``, the memory from
    that page on: Invalid unless the page holds one whole VMCOREINFO (well-formed
    lines, then zeros to the end of its own page) within ``capacity`` bytes."""
    end = rest.find(b"\0", 0, capacity)
    if end < 0:
        raise Invalid(f"no end within {capacity} bytes")
    text = rest[:end]
    page = number(parse(text)["PAGESIZE"], "PAGESIZE")
    if gpa % page or page > len(rest):
        raise Invalid(f"not aligned to its {page}-byte page")
    if rest.count(0, end, page) != page - end:
        raise Invalid("not followed by zeros to the end of its page")
    return text


def kernel_phys(entries: dict[str, str], arch: Arch, va: int) -> int | None:
    """The physical address of kernel-image address ``va``, by the rule VMCOREINFO
    itself gives for ``arch``; None where there is no such rule (i386, s390)."""
    if arch.machine == EM_X86_64:
        return va - _START_KERNEL_MAP + number(entries.get("NUMBER(phys_base)"), "phys_base")
    if arch.machine == EM_AARCH64:
        return va - number(entries.get("NUMBER(kimage_voffset)"), "kimage_voffset")
    if arch.machine == EM_PPC64 and arch.bits == 64:
        return va - _PPC64_PAGE_OFFSET
    return None


def check_release(entries: dict[str, str], arch: Arch, read_at: ReadPhys) -> bool:
    """Check that ``init_uts_ns`` holds the release OSRELEASE names: a page left
    by an earlier kernel fails. ``read_at(gpa, n)`` reads the vmcore (None where
    it holds no memory). False if ``arch`` gives no way to check."""
    va = number(entries["SYMBOL(init_uts_ns)"], "SYMBOL(init_uts_ns)", base=16)
    pa = kernel_phys(entries, arch, va)
    if pa is None:
        return False
    name = number(entries.get("OFFSET(uts_namespace.name)"), "OFFSET(uts_namespace.name)")
    found = read_at(pa + name + _RELEASE_OFFSET, _NEW_UTS_LEN)
    if found is None:
        raise Invalid(f"init_uts_ns (physical {pa:#x}) is not in the dump")
    if found.split(b"\0", 1)[0].decode(errors="replace") != entries["OSRELEASE"]:
        raise Invalid(f"init_uts_ns (physical {pa:#x}) does not hold release "
                      f"{entries['OSRELEASE']}: a stale page")
    return True


def x86_64_translate(root: int, va: int, levels: int, read_at: ReadPhys) -> int | None:
    """The physical address the x86_64 page tables at ``root`` (CR3) map ``va`` to,
    through 4 or 5 ``levels``; None if unmapped or the tables are not in the dump."""
    found = x86_64_mapping(root, va, levels, read_at)
    return None if found is None else found[0]


def x86_64_mapping(root: int, va: int, levels: int, read_at: ReadPhys) -> tuple[int, int] | None:
    """:func:`x86_64_translate`'s address, and how many bytes from ``va`` on the
    same page (4 KiB, 2 MiB or 1 GiB) maps on: contiguous physical memory."""
    table = root & _PTE_ADDRESS
    for level in range(levels - 1, -1, -1):
        shift = 12 + 9 * level
        raw = read_at(table + (va >> shift & 511) * 8, 8)
        if raw is None:
            return None
        entry = int.from_bytes(raw, "little")
        if not entry & _PTE_PRESENT:
            return None
        if level == 0 or (level <= 2 and entry & _PTE_HUGE):  # 4 KiB, 2 MiB, 1 GiB
            within = va & ((1 << shift) - 1)
            return (entry & _PTE_ADDRESS & -(1 << shift)) | within, (1 << shift) - within
        table = entry & _PTE_ADDRESS
    return None


def aarch64_translate(entries: dict[str, str], va: int) -> int:
    """The physical address of arm64 kernel address ``va`` in the linear map or the
    kernel image, by asm/memory.h's rule and the numbers VMCOREINFO gives (no page
    table is read); Invalid if VMCOREINFO lacks them.

    The linear map starts at PAGE_OFFSET, which maps PHYS_OFFSET; the image is
    mapped ``kimage_voffset`` above its physical address. Since Linux 5.4 the
    linear map is the lower half of the kernel's address space, from
    ``-(1 << VA_BITS)`` to PAGE_END (``-(1 << (VA_BITS_MIN - 1))``), and the
    image above it; before, the upper half, from ``-(1 << (VA_BITS - 1))``, with
    the image below. The half the image lies in (``init_uts_ns``'s) tells which.
    A 52-bit VA kernel on 48-bit hardware (``TCR_EL1_T1SZ`` gives the VA size
    it runs with) lowers PHYS_OFFSET (made negative, printed as 64 bits) so the
    same rule holds from Linux 5.11 on; 5.4 to 5.10 instead counted the linear
    map from ``-(1 << 48)``. Any other address (vmalloc, modules) is taken for
    an image one, which the printk reader does not meet.
    """
    va_bits = number(entries.get("NUMBER(VA_BITS)"), "NUMBER(VA_BITS)")
    if not 36 <= va_bits <= 52:
        raise Invalid(f"NUMBER(VA_BITS)={va_bits} is not an arm64 VA size")
    page = number(entries.get("PAGESIZE"), "PAGESIZE")
    va_bits_min = va_bits if va_bits <= 48 else 47 if page == 16384 else 48
    image = number(entries.get("SYMBOL(init_uts_ns)"), "SYMBOL(init_uts_ns)", base=16)
    page_end = _U64 + 1 - (1 << (va_bits_min - 1))
    va &= _U64
    if image >= page_end:  # 5.4 on: the linear map below PAGE_END
        page_offset = _U64 + 1 - (1 << va_bits)
        linear = page_offset <= va < page_end
        t1sz = entries.get("NUMBER(TCR_EL1_T1SZ)")
        if t1sz is not None and _release(entries) < (5, 11):
            page_offset = _U64 + 1 - (1 << (64 - number(t1sz, "NUMBER(TCR_EL1_T1SZ)")))
    else:
        page_offset = _U64 + 1 - (1 << (va_bits - 1))
        linear = va >= page_offset
    if linear:
        phys_offset = number(entries.get("NUMBER(PHYS_OFFSET)"), "NUMBER(PHYS_OFFSET)")
        return (va - page_offset + phys_offset) & _U64
    return (va - number(entries.get("NUMBER(kimage_voffset)"), "kimage_voffset")) & _U64


def _release(entries: dict[str, str]) -> tuple[int, int]:
    """OSRELEASE's major and minor version; (0, 0) if it names none."""
    m = re.match(r"(\d+)\.(\d+)", entries.get("OSRELEASE", ""))
    return (int(m[1]), int(m[2])) if m else (0, 0)


def number(text: str | None, what: str, base: int = 10) -> int:
    """A VMCOREINFO number: decimal (``%ld``), or hex with 0x; SYMBOL()s are bare hex."""
    if text is None:
        raise Invalid(f"lacks {what}")
    try:
        return int(text, 16) if text.lower().startswith(("0x", "-0x")) else int(text, base)
    except ValueError:
        raise Invalid(f"{what}={text} is not a number") from None


def _page_roots(arch: Arch, cpu: CpuNotes) -> list[int]:
    return (x86_page_tables(cpu) if isinstance(cpu, QemuNotes)
            and arch.machine == EM_X86_64 else [])


def _note_size(owner: str, desc: int) -> int:
    """Bytes a note takes: the same in ELF32 and ELF64 (three words, 4-byte padding)."""
    return 12 + _pad4(len(owner) + 1) + _pad4(desc)


def _pad4(n: int) -> int:
    return n + (-n % 4)


class Search:
    """VMCOREINFO for one dump: QEMU's note, or one found while memory is written.

    Used in three steps: ``room`` is reserved in the layout (or none is);
    ``inspector(layout)`` is the writer's hook, which sees every
    chunk written; ``finish(out)``, once memory is written, validates what
    was seen, writes the note into the room and says what was done.
    ``result`` is known from the start when there is nothing to look for;
    otherwise the layout given to ``inspector`` is the one ``finish`` writes.
    """

    def __init__(self, arch: Arch, cpu: CpuNotes, to_stdout: bool) -> None:
        self.arch = arch
        self.result: Result | None = None
        self._room = True
        # The page tables the vCPUs run on, to tell the running kernel's page
        # from an earlier kernel's that survived a reboot intact.
        self._roots = _page_roots(arch, cpu)
        if isinstance(cpu, QemuNotes) and NAME in cpu.names:
            self.result = Result("qemu", "VMCOREINFO from QEMU's vmcoreinfo device")
            self._room = False
        elif to_stdout:  # The room stays zeros: the same bytes as a file would hold.
            self.result = Result("none", "no VMCOREINFO: its place in the notes precedes "
                                 "memory, which standard output cannot go back to (write "
                                 "to a file, or give the VM -device vmcoreinfo)")
        self.capacity = _LARGEST_PAGE.get(arch.machine, SCAN_ALIGN)
        self._candidates: dict[bytes, int] = {}  # text -> the lowest GPA it was seen at
        # Why candidates failed, for the report: those at the lowest addresses
        # (pages are shown in no set order, so kept by address, not by arrival).
        self._rejected: list[tuple[int, str]] = []
        self._looks = 0
        self._overflow = False  # more than _MAX_LOOKS: nothing is trusted
        self._layout: CoreLayout | None = None  # the dump looked through, once inspector() ran
        self.text: bytes | None = None  # the VMCOREINFO written by finish(), if any

    @property
    def room(self) -> int:
        """Bytes the layout must reserve after its notes: the largest note."""
        return _note_size(NAME, self.capacity) if self._room else 0

    def settle(self, arch: Arch, cpu: CpuNotes, layout: CoreLayout) -> None:
        """The dump's identity, CPU notes and layout, where they are known only once
        memory is written (``--live`` with the notes from the stream): the slot keeps
        its place in memory's view and its size, the header is the new layout's."""
        if _LARGEST_PAGE.get(arch.machine, SCAN_ALIGN) != self.capacity:
            raise ValueError(f"a VMCOREINFO slot for {self.arch.name} cannot serve {arch.name}")
        self.arch = arch
        self._roots = _page_roots(arch, cpu)
        if self._layout is not None:
            self._layout = layout

    def inspector(self, layout: CoreLayout) -> Inspect | None:
        """The writer's hook for a dump of ``layout``, or None if there is nothing to find."""
        if self.result:
            return None
        self._layout = layout

        def inspect(offset: int, data: Chunk, length: int) -> None:
            self._inspect(layout, offset, data, length)
        return inspect

    def _inspect(self, layout: CoreLayout, offset: int, data: Chunk, length: int) -> None:
        """Look for pages starting with OSRELEASE= in the ``length`` bytes of ``data``
        written at file ``offset`` of ``layout``. Only page starts can match, so their
        first bytes are gathered by one strided slice (C speed, 256 bytes a MiB) and only
        those starting with "O" are compared further, whatever the chunk holds."""
        i = bisect.bisect_right(layout.offsets, offset) - 1
        if i < 0 or self._overflow or offset + length > layout.offsets[i] + layout.blocks[i].size:
            return  # the header; too many look-alikes; (never: chunks lie within blocks)
        self.look(layout.blocks[i].gpa + offset - layout.offsets[i], data, length)

    def look(self, gpa: int, data: Chunk, length: int) -> None:
        """Look for VMCOREINFO pages in the ``length`` bytes of guest memory at
        ``gpa`` that ``data`` begins with (by any thread, one at a time)."""
        if self._overflow:
            return
        first = -gpa % SCAN_ALIGN
        starts = data[first:length:SCAN_ALIGN]
        page = starts.find(MAGIC[0])
        while page >= 0:
            at = first + page * SCAN_ALIGN
            if data[at : at + len(MAGIC)] == MAGIC:
                self._consider(gpa + at, bytes(data[at:length]))
            page = starts.find(MAGIC[0], page + 1)

    def _consider(self, gpa: int, rest: bytes) -> None:
        """Take the text at the start of ``rest`` (the chunk from a candidate page on)
        as a candidate if it is one whole VMCOREINFO page."""
        self._looks += 1
        if self._looks > _MAX_LOOKS:
            self._overflow = True  # A guest that fills pages with look-alikes: give up.
            return
        try:
            text = page_text(gpa, rest, self.capacity)
        except Invalid as e:
            self._reject(gpa, e)
            return
        # The lowest address a text is seen at, whichever thread saw it first.
        self._candidates[text] = min(gpa, self._candidates.get(text, gpa))

    def _reject(self, gpa: int, why: Invalid) -> None:
        self._rejected = sorted([*self._rejected, (gpa, str(why))])[:_MAX_REASONS]

    def finish(self, out: VmcoreFile) -> Result:
        """Validate the candidates against the written vmcore; write the one that
        passes into the slot. Never raises for what the guest's memory holds."""
        if self.result:
            return self.result
        layout = self._layout
        if layout is None:
            raise RuntimeError("VMCOREINFO search finished before inspector() was given a layout")
        result, text = self.validate(self._reader(layout, out))
        self.text = text
        if text is not None:
            for offset, data in layout.add_note(Note(NAME, NT_VMCOREINFO, text).encode(
                    layout.structs)):
                out.write_at(offset, data)
        return result

    def validate(self, read_at: ReadPhys) -> tuple[Result, bytes | None]:
        """The candidates seen, checked against guest memory as ``read_at`` reads it:
        what the report says, and the one text to write (None: none is trusted)."""
        if self.result:
            return self.result, None
        valid: dict[bytes, tuple[int, dict[str, str], bool]] = {}
        # Whole pages whose kernel is gone (its init_uts_ns overwritten): named in
        # the report even when another page is chosen, so none goes unexplained.
        stale: list[tuple[int, str]] = []
        for text, gpa in self._candidates.items():
            entries = parse(text)
            try:
                checked = check_release(entries, self.arch, read_at)
            except Invalid as e:
                self._reject(gpa, e)
                stale.append((gpa, str(e)))
                continue
            valid[text] = (gpa, entries, checked)
        if self._overflow:
            return Result("none", f"no VMCOREINFO: more than {_MAX_LOOKS} pages in guest "
                          "memory start like it; none was trusted"), None
        earlier = ""
        if len(valid) > 1:
            running = {t: v for t, v in valid.items()
                       if self._running(v[1], read_at)}
            if len(running) == 1:
                earlier = "; " + ", ".join(
                    f"GPA {g:#x} is an earlier kernel's (not mapped by the running one)"
                    for t, (g, _, _) in valid.items() if t not in running)
                valid = running
        if len(valid) > 1:
            where = ", ".join(f"{g:#x}" for g, _, _ in valid.values())
            return Result("none", f"no VMCOREINFO: {len(valid)} different valid-looking "
                          f"pages in guest memory (GPA {where}); none was trusted"), None
        if not valid:
            why = (f" (rejected: {'; '.join(f'{gpa:#x}: {r}' for gpa, r in self._rejected)})"
                   if self._rejected else "")
            return Result("none", "no VMCOREINFO: none found in guest memory (not a "
                          f"booted Linux guest?){why}"), None
        (text, (gpa, entries, checked)), = valid.items()
        release = entries["OSRELEASE"]
        unchecked = "" if checked else f", not cross-checked on {self.arch.name}"
        aside = "".join(f"; GPA {g:#x} set aside: {why}"
                        for g, why in sorted(stale)[:_MAX_REASONS])
        return Result("guest", f"VMCOREINFO of Linux {release} found in guest memory at "
                      f"GPA {gpa:#x}{unchecked}{earlier}{aside}", gpa, release), text

    def _running(self, entries: dict[str, str], read_at: ReadPhys) -> bool:
        """Whether the page tables some vCPU runs on map this VMCOREINFO's
        init_uts_ns where it says: only the running kernel's do."""
        va = number(entries["SYMBOL(init_uts_ns)"], "SYMBOL(init_uts_ns)", base=16)
        pa = kernel_phys(entries, self.arch, va)
        levels = 5 if entries.get("NUMBER(pgtable_l5_enabled)") == "1" else 4
        return any(x86_64_translate(root, va, levels, read_at) == pa
                   for cr3 in self._roots for root in (cr3, cr3 & ~_PTI_USER_BIT))

    @staticmethod
    def _reader(layout: CoreLayout, out: VmcoreFile) -> ReadPhys:
        def read_at(gpa: int, n: int) -> bytes | None:
            for block, offset in zip(layout.blocks, layout.offsets, strict=True):
                if block.gpa <= gpa and gpa + n <= block.end:
                    return out.read_at(offset + gpa - block.gpa, n)
            return None
        return read_at
