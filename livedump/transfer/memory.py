"""QEMU's address space seen from outside: its mappings, and reads of its memory."""

import ctypes
import errno
import functools
import mmap
import os
import re
import stat
import sys
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from livedump import proc
from livedump.errors import DumpIOError, GuestMemoryError, LivedumpError, ProcessNotFound
from livedump.vmcore.blocks import Block


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    path: str
    device: str = "00:00"  # major:minor in hex, as the kernel prints it
    inode: int = 0

    @property
    def private_anonymous(self) -> bool:
        """Only here does a page that is neither present nor swapped read as
        zeros for sure: a shared or file-backed page can exist without being
        mapped in this process."""
        return self.perms.endswith("p") and not self.path


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of ``/proc/PID/maps``."""
    maps = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        start, _, end = fields[0].partition("-")
        maps.append(
            Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                    fields[5] if len(fields) > 5 else "", fields[3], int(fields[4]))
        )
    return maps


def read_maps(pid: int) -> list[Mapping]:
    return parse_maps(proc.read_text(pid, "maps", "read the mappings of"))


def check_blocks(blocks: Sequence[Block], maps: Sequence[Mapping]) -> list[list[Mapping]]:
    """Fail unless every block lies in readable mappings of the process.

    The monitor's map and the process's must agree; if they do not, we
    would read the wrong memory, so stop before writing anything. Returns,
    per block, the mappings that cover it, in order.
    """
    found = []
    for b in blocks:
        covering, stop = _readable(b.hva, b.hva + b.size, maps)
        if stop < b.hva + b.size:
            name = f"{b.name!r}, " if b.name else ""
            raise GuestMemoryError(
                f"guest RAM at {b.gpa:#x} ({name}host {b.hva:#x}, {b.size:#x} bytes) "
                f"is not mapped readable in QEMU at {stop:#x}"
            )
        found.append(covering)
    return found


@dataclass(frozen=True)
class Span:
    """The part ``[start, end)`` of a block (offsets in it) that lies in one
    mapping of QEMU's, and where its pages that QEMU has not mapped are.

    Private anonymous memory: nowhere, they are zeros. Else, with ``file``
    (a descriptor on the mapping's file, ``start`` at ``file_offset`` in it),
    in that file, read there without creating its holes or mapping anything
    into QEMU. Else (a file we may not open) only through QEMU, which may
    populate them.
    """

    start: int
    end: int
    private: bool
    file: int | None = None
    file_offset: int = 0


class BackingFiles:
    """Descriptors on the files behind QEMU's shared and file-backed guest RAM.

    Through ``/proc/PID/map_files`` (the mapping's own file, whatever its
    name: a memfd, a deleted file, the shared memory of an anonymous shared
    mapping), which takes CAP_SYS_ADMIN; else through a descriptor QEMU
    holds on the same file (memory-backend-memfd and -file keep theirs).
    Regular files only: a device's read need not mean its memory.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._opened: dict[tuple[int, int], int | None] = {}

    def spans(self, block: Block, covering: Sequence[Mapping]) -> list[Span]:
        """``block``'s parts, one per mapping of ``covering`` (from :func:`check_blocks`)."""
        spans = []
        for m in covering:
            start = max(m.start, block.hva) - block.hva
            end = min(m.end, block.hva + block.size) - block.hva
            if m.private_anonymous:
                spans.append(Span(start, end, True))
                continue
            fd = self._open(m)
            spans.append(Span(start, end, False, fd, m.offset + block.hva + start - m.start))
        return spans

    def _open(self, m: Mapping) -> int | None:
        key = (m.start, m.end)
        if key not in self._opened:
            fd = _open_regular(proc.path(self.pid, f"map_files/{m.start:x}-{m.end:x}"))
            self._opened[key] = fd if fd is not None else self._qemus_descriptor(m)
        return self._opened[key]

    def _qemus_descriptor(self, m: Mapping) -> int | None:
        try:
            names = os.listdir(proc.path(self.pid, "fd"))
        except OSError:
            return None
        for name in names:
            link = proc.path(self.pid, f"fd/{name}")
            try:
                st = os.stat(link)
            except OSError:
                continue
            if (st.st_ino == m.inode and stat.S_ISREG(st.st_mode)
                    and f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}" == m.device):
                return _open_regular(link)
        return None

    def close(self) -> None:
        for fd in self._opened.values():
            if fd is not None:
                os.close(fd)
        self._opened.clear()

    def __enter__(self) -> "BackingFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_regular(path: str) -> int | None:
    """A descriptor on the regular file at ``path``; None for anything else
    (looked at before it is opened: opening a device can do things)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def file_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, data)`` runs of the file between ``start`` and ``end``, by
    ``SEEK_DATA``/``SEEK_HOLE``, widened to whole pages: data, or holes that
    read as zeros. A file system that cannot tell (hugetlbfs) says all is data;
    reading its holes creates nothing either."""
    pos = start
    while pos < end:
        try:
            data = min(end, max(pos, os.lseek(fd, pos, os.SEEK_DATA) // PAGE_SIZE * PAGE_SIZE))
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data from pos to the end of the file
                yield pos, end, True
                return
            data = end
        if data > pos:
            yield pos, data, False
        if data >= end:
            return
        hole = min(end, -(-os.lseek(fd, data, os.SEEK_HOLE) // PAGE_SIZE) * PAGE_SIZE)
        yield data, hole, True
        pos = hole


def check_ram(name: str, start: int, end: int, maps: Sequence[Mapping]) -> None:
    """Fail unless QEMU's RAM block ``name`` (as messages show it), said to be
    at ``[start, end)``, lies in readable mappings that can hold guest RAM:
    not the heap, a stack or a page of the kernel's (``[heap]``...), nor the
    file of a program or library."""
    covering, stop = _readable(start, end, maps)
    images = {m.path for m in maps if "x" in m.perms and m.path}
    for m in covering:
        if (m.path.startswith("[") and not m.path.startswith("[anon:")) or m.path in images:
            raise GuestMemoryError(
                f"QEMU's RAM block {name} would be at {max(start, m.start):#x}, "
                f"in {m.path}: not guest RAM")
    if stop < end:
        raise GuestMemoryError(f"QEMU's RAM block {name} ({end - start:#x} bytes at "
                               f"{start:#x}) is not mapped readable in QEMU at {stop:#x}")


def _readable(start: int, end: int, maps: Sequence[Mapping]) -> tuple[list[Mapping], int]:
    """The readable mappings that cover ``[start, end)`` from ``start`` on, in
    order (``maps`` is sorted, as the kernel lists it), and where they stop:
    ``end`` if they cover all of it."""
    covering, addr = [], start
    for m in maps:
        if m.start <= addr < m.end:
            if "r" not in m.perms:
                break
            covering.append(m)
            addr = m.end
            if addr >= end:
                return covering, end
    return covering, addr


def _reading(address: int, guest: Block | None) -> str:
    """What was being read, for an error: the guest's address and region first."""
    if guest is None:
        return f"reading QEMU memory at {address:#x}"
    name = f" in {guest.name!r}" if guest.name else ""
    return (f"reading guest memory at {guest.gpa + address - guest.hva:#x}{name} "
            f"(QEMU's {address:#x})")


def _cause(pid: int, err: int, address: int, guest: bool) -> str:
    """Why reading QEMU's ``address`` (``guest``: guest RAM, found mapped
    before) failed with ``err``, as far as the mapping there tells."""
    code = errno.errorcode.get(err, str(err))
    if err == errno.EIO:
        return "I/O error (EIO): a hardware memory error, or the file behind it failed"
    if err != errno.EFAULT:
        return f"{os.strerror(err)} ({code})"
    m = next((m for m in read_maps(pid) if m.start <= address < m.end), None)
    if m is None:
        return "QEMU unmapped it during the dump (EFAULT)" if guest else "not mapped (EFAULT)"
    if "r" not in m.perms:
        return ("QEMU made it unreadable during the dump (EFAULT)" if guest else
                "not readable (EFAULT)")
    if _page_size(pid, m) > PAGE_SIZE:
        free = _meminfo("HugePages_Free")
        why = ("no huge page left in the host's pool" if free == 0 else
               "the host could not give it a huge page")
        return f"{why} (EFAULT, {m.path or 'anonymous huge pages'})"
    if m.path and not m.path.startswith("["):
        return f"past the end of the file behind it, {m.path} (EFAULT)"
    return "the kernel could not provide the page (EFAULT)"


def _page_size(pid: int, m: Mapping) -> int:
    """The mapping's page size in the kernel (huge for hugetlbfs), from smaps."""
    try:
        text = proc.read_text(pid, "smaps", "read the mappings of")
    except LivedumpError:
        return PAGE_SIZE
    at = text.find(f"{m.start:x}-{m.end:x} ")
    found = re.compile(r"^KernelPageSize:\s+(\d+) kB", re.M).search(text, max(at, 0))
    return int(found.group(1)) * 1024 if at >= 0 and found else PAGE_SIZE


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0])
    except OSError:
        pass
    return None


def read_file(buf: "Buffer", length: int, fd: int, offset: int, guest: Block,
              address: int) -> memoryview:
    """Fill ``buf`` with ``length`` bytes of the file behind guest memory, from
    ``offset``: QEMU's ``address`` maps it, named in errors. A hole reads as
    zeros and stays a hole, on every file system (hugetlbfs too)."""
    done = 0
    while done < length:
        try:
            n = os.preadv(fd, [buf.view[done:length]], offset + done)
        except OSError as e:
            err = e.errno or errno.EIO
            raise DumpIOError(f"{_reading(address + done, guest)}: {os.strerror(err)} "
                              f"({errno.errorcode.get(err, err)}) reading the file behind it"
                              ) from None
        if n == 0:
            raise DumpIOError(f"{_reading(address + done, guest)}: past the end of the file "
                              f"behind it, at {offset + done:#x}")
        done += n
    return buf.view[:length]


class MemorySource(Protocol):
    """Where QEMU's memory is read from: a live process (:class:`ProcessMemory`)
    or the core file of one. The RAM-map walk, the vCPU reader and the copy
    read through this alone."""

    def read(self, buf: "Buffer", length: int, address: int,
             guest: Block | None = None) -> memoryview:
        """``length`` bytes from ``address`` into ``buf``; ``guest``: the guest
        RAM block being read, named in errors."""


class Populated(Protocol):
    """Which pages of a memory source hold data (:class:`PageMap` for a process)."""

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, kind)`` runs: :data:`ABSENT`, :data:`DATA` or :data:`ZERO`
        (a source that knows only present or not may say False or True)."""


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                              ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
_process_vm_readv.restype = ctypes.c_ssize_t


class Buffer:
    """A reusable read buffer at a fixed address, as process_vm_readv needs.

    Page-aligned (its own mapping): a page copied to nearly the same offset
    in another page, as into malloc's large blocks 16 bytes in, runs several
    times slower, the copy's loads stalling on its own stores (4K aliasing).
    """

    def __init__(self, size: int) -> None:
        self.data = mmap.mmap(-1, size)
        self.view = memoryview(self.data)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.data))


class ProcessMemory:
    """Reads another process's memory: process_vm_readv, else ``/proc/PID/mem``.

    process_vm_readv is the faster (one call, no file offset to seek); the
    file is the fallback where a seccomp policy forbids the system call.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1
        self._fd = proc.open_fd(pid, "mem", "read the memory of")
        self._use_syscall = True

    def read(self, buf: Buffer, length: int, address: int,
             guest: Block | None = None) -> memoryview:
        """Fill the first ``length`` bytes of ``buf`` from ``address``; return them.

        ``guest``: the block ``address`` lies in, named in errors.
        """
        done = 0
        while done < length:
            n = self._read_some(buf, done, length - done, address + done, guest)
            if n == 0:
                raise DumpIOError(f"{_reading(address + done, guest)}: unexpected end")
            done += n
        return buf.view[:length]

    def _read_some(self, buf: Buffer, offset: int, length: int, address: int,
                   guest: Block | None) -> int:
        if self._use_syscall:
            local = _IOVec(buf.address + offset, length)
            remote = _IOVec(address, length)
            n: int = _process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote),
                                       1, 0)
            if n >= 0:
                return n
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                self._fail(err, address, guest)
            self._use_syscall = False
        try:
            return os.preadv(self._fd, [buf.view[offset : offset + length]], address)
        except OSError as e:
            self._fail(e.errno or errno.EIO, address, guest)

    def _fail(self, err: int, address: int, guest: Block | None) -> typing.NoReturn:
        if err == errno.ESRCH or not proc.alive(self.pid):
            raise ProcessNotFound(f"QEMU (PID {self.pid}) exited during the dump")
        cause = _cause(self.pid, err, address, guest is not None)
        raise DumpIOError(f"{_reading(address, guest)}: {cause}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PM_ENTRY = 8
# Each pagemap entry is a native-endian u64; bit 63 is "present", bit 62
# "swapped", bits 0-54 the page frame number (0 unless we have CAP_SYS_ADMIN).
# The byte holding the flags, mapped to 1 when either is set:
_PM_FLAGS_BYTE = 7 if sys.byteorder == "little" else 0
_PM_POPULATED = bytes(1 if b & 0xC0 else 0 for b in range(256))
_PFN_BITS = 55
_KPF_ZERO_PAGE = 24  # in /proc/kpageflags

# What PageMap.extents says of a run of pages.
ABSENT = 0  # never populated (or, in shared memory, not mapped by QEMU)
DATA = 1  # present or swapped
ZERO = 2  # mapped to the kernel's shared zero page: read, never written
_RUNS = re.compile(rb"\x00+|\x01+|\x02+")


@functools.cache
def zero_frames() -> tuple[tuple[int, int], ...]:
    """The frames of the kernel's shared zero pages, as ``(first, count)``:
    the 4 KiB one, and the transparent huge one where there is one.

    Learnt from our own address space: a page of ours that we read but never
    wrote is mapped to the zero page (a huge one in a huge-page-aligned
    range that may have transparent huge pages); its frame is in our page
    map, confirmed by ``/proc/kpageflags``. Empty without the rights to see
    frame numbers: then nothing is taken for the zero page.
    """
    found: list[tuple[int, int]] = []
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        kpageflags = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ()
    try:
        def zero_frame(m: mmap.mmap, at: int) -> int | None:
            m[at]  # a read fault: the zero page, where nothing else is
            address = ctypes.addressof(ctypes.c_char.from_buffer(m, at))
            entry = int.from_bytes(os.pread(pagemap, 8, address // PAGE_SIZE * 8), sys.byteorder)
            frame = entry & ((1 << _PFN_BITS) - 1)
            flags = os.pread(kpageflags, 8, frame * 8)
            if not frame or len(flags) < 8:
                return None
            return frame if int.from_bytes(flags, sys.byteorder) >> _KPF_ZERO_PAGE & 1 else None

        anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        small = zero_frame(mmap.mmap(-1, PAGE_SIZE, flags=anonymous), 0)
        if small is not None:
            found.append((small, 1))
        huge = _thp_size()
        if huge:
            region = mmap.mmap(-1, 2 * huge, flags=anonymous)
            base = ctypes.addressof(ctypes.c_char.from_buffer(region))
            at = -base % huge
            if hasattr(mmap, "MADV_HUGEPAGE"):
                region.madvise(mmap.MADV_HUGEPAGE, at, huge)
            frame = zero_frame(region, at)
            count = huge // PAGE_SIZE
            if frame is not None and frame != small and frame % count == 0:
                found.append((frame, count))
    except OSError:
        pass
    finally:
        os.close(pagemap)
        os.close(kpageflags)
    return tuple(found)


def _thp_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


class _ZeroPages:
    """Finds the page map entries that map a zero page, a group of entries at a time.

    A group is the entries of one transparent huge page (aligned in the
    address space), or as many. Most groups are one thing whole: the huge
    zero page (the entries of its frames in order, each with the same flags:
    compared as bytes with the entries of a whole one), the 4 KiB zero page
    throughout (one entry repeated), or no zero page at all (its frame's
    bytes nowhere in the group). Only the rest are looked at entry by entry.
    """

    _PFN_MASK = (1 << _PFN_BITS) - 1

    def __init__(self, frames: Sequence[tuple[int, int]]) -> None:
        self.small = next((first for first, count in frames if count == 1), None)
        self.huge = next(((first, count) for first, count in frames if count > 1), None)
        self.group = self.huge[1] if self.huge else 512
        little = sys.byteorder == "little"
        self._small_bytes = (b"" if self.small is None else
                             self.small.to_bytes(8, sys.byteorder)[:6] if little else
                             self.small.to_bytes(8, sys.byteorder)[2:])
        self._whole_huge: dict[int, bytes] = {}  # by the entry of the first frame
        self._whole_window: dict[tuple[int, int], bytes] = {}  # (that, length): repeated

    def __bool__(self) -> bool:
        return self.small is not None or self.huge is not None

    def ranges(self, entries: bytes, page: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` runs of the entries (the first for page number
        ``page``) that map a zero page, in order, apart."""
        count, group = len(entries) // _PM_ENTRY, self.group
        if self._all_zero(entries, page):
            yield 0, count
            return
        run: tuple[int, int] | None = None
        start = 0
        while start < count:
            within = (page + start) % group
            end = min(count, start + group - within)
            found = self._group(entries, start, end, within)
            for zero in ([found] if found else
                         self._entry_by_entry(entries, start, end)):
                if run is not None and run[1] == zero[0]:
                    run = (run[0], zero[1])
                else:
                    if run is not None:
                        yield run
                    run = zero
            start = end
        if run is not None:
            yield run

    def _all_zero(self, entries: bytes, page: int) -> bool:
        """Whether every entry maps a zero page, the same way: as after a read of
        all memory, compared whole (no copy of the entries made)."""
        head = int.from_bytes(entries[:_PM_ENTRY], sys.byteorder)
        if not head >> 63:
            return False
        frame = head & self._PFN_MASK
        if frame == self.small:
            return entries.count(entries[:_PM_ENTRY]) == len(entries) // _PM_ENTRY
        if self.huge is None or frame != self.huge[0] or page % self.group:
            return False
        key = (head, len(entries))
        if key not in self._whole_window:
            if len(entries) % (self.group * _PM_ENTRY):
                return False
            self._whole_huge.setdefault(head, self._huge_entries(head))
            self._whole_window.clear()  # one at a time: most windows are alike
            self._whole_window[key] = self._whole_huge[head] * (
                len(entries) // (self.group * _PM_ENTRY))
        return entries == self._whole_window[key]

    def _group(self, entries: bytes, start: int, end: int,
               within: int) -> tuple[int, int] | None:
        """``(start, end)`` if the group is a zero page throughout."""
        part = entries[start * _PM_ENTRY : end * _PM_ENTRY]
        head = int.from_bytes(part[:_PM_ENTRY], sys.byteorder)
        if head >> 63 and (self._is_huge(head, within, part) or self._is_small(head, part)):
            return start, end
        return None

    def _is_huge(self, head: int, within: int, part: bytes) -> bool:
        if self.huge is None or (head & self._PFN_MASK) != self.huge[0] + within:
            return False
        first = head - within
        whole = self._whole_huge.get(first)
        if whole is None:
            whole = self._whole_huge[first] = self._huge_entries(first)
        return part == whole[within * _PM_ENTRY : within * _PM_ENTRY + len(part)]

    def _huge_entries(self, first: int) -> bytes:
        """The entries of a whole huge zero page whose first entry is ``first``."""
        return b"".join((first + i).to_bytes(_PM_ENTRY, sys.byteorder)
                        for i in range(self.group))

    def _is_small(self, head: int, part: bytes) -> bool:
        return ((head & self._PFN_MASK) == self.small
                and part == part[:_PM_ENTRY] * (len(part) // _PM_ENTRY))

    def _entry_by_entry(self, entries: bytes, start: int,
                        end: int) -> Iterator[tuple[int, int]]:
        part = entries[start * _PM_ENTRY : end * _PM_ENTRY]
        if not self._small_bytes or self._small_bytes not in part:
            return
        for i, entry in enumerate(memoryview(part).cast("Q")):
            if entry >> 63 and (entry & self._PFN_MASK) == self.small:
                yield start + i, start + i + 1


class PageMap:
    """Which pages of a process are populated, and which map the zero page,
    from ``/proc/PID/pagemap``."""

    WINDOW = 32768  # pages looked up per read (128 MiB of 4 KiB pages)

    def __init__(self, pid: int) -> None:
        self._fd = proc.open_fd(pid, "pagemap", "read the page map of")
        self._zero = _ZeroPages(zero_frames())

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(offset, length, kind)`` runs covering ``[address, address + size)``:
        :data:`ABSENT`, :data:`DATA` or :data:`ZERO`.

        ``address`` and ``size`` are page-aligned. The work is per run, not per page.
        """
        first, count = address // PAGE_SIZE, size // PAGE_SIZE
        run_start, run_kind = 0, -1
        for base in range(0, count, self.WINDOW):
            n = min(self.WINDOW, count - base)
            entries = os.pread(self._fd, n * _PM_ENTRY, (first + base) * _PM_ENTRY)
            if len(entries) != n * _PM_ENTRY:
                raise DumpIOError(f"short read of the page map at {address:#x}")
            kinds = entries[_PM_FLAGS_BYTE::_PM_ENTRY].translate(_PM_POPULATED)
            if self._zero and b"\1" in kinds:
                marked = bytearray(kinds)
                for start, end in self._zero.ranges(entries, first + base):
                    marked[start:end] = b"\2" * (end - start)
                kinds = bytes(marked)
            for run in _RUNS.finditer(kinds):
                kind = kinds[run.start()]
                if kind != run_kind:
                    if run_kind >= 0:
                        yield (run_start * PAGE_SIZE, (base + run.start() - run_start) * PAGE_SIZE,
                               run_kind)
                    run_start, run_kind = base + run.start(), kind
        if run_kind >= 0:
            yield run_start * PAGE_SIZE, (count - run_start) * PAGE_SIZE, run_kind

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "PageMap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_with_data(pid: int, blocks: Sequence[Block]) -> int | None:
    """The guest-physical address of a page of ``blocks`` that QEMU has, with
    data (not the zero page), if the page map shows one: where QEMU's
    one-page dump, taken for its CPU notes, reads without creating a page (a
    huge one, in hugetlb memory)."""
    with PageMap(pid) as pagemap:
        for b in blocks:
            if (b.hva | b.size) % PAGE_SIZE == 0:
                for offset, _, kind in pagemap.extents(b.hva, b.size):
                    if kind == DATA:
                        return b.gpa + offset
    return None
