"""QEMU's address space seen from outside: its mappings, and reads of its memory."""

import ctypes
import errno
import mmap
import os
import sys
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from livedump import proc
from livedump.errors import DumpIOError, GuestMemoryError, ProcessNotFound
from livedump.vmcore.blocks import Block


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of ``/proc/PID/maps``."""
    maps = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        start, _, end = fields[0].partition("-")
        maps.append(
            Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                    fields[5] if len(fields) > 5 else "")
        )
    return maps


def read_maps(pid: int) -> list[Mapping]:
    return parse_maps(proc.read_text(pid, "maps", "read the mappings of"))


def check_blocks(blocks: Sequence[Block], maps: Sequence[Mapping]) -> list[bool]:
    """Fail unless every block lies in readable mappings of the process.

    The monitor's map and the process's must agree; if they do not, we
    would read the wrong memory, so stop before writing anything. Returns,
    per block, whether all of it is private anonymous memory: only there
    does a page that is neither present nor swapped read as zero for sure
    (a shared or file-backed page can exist without being mapped here).
    """
    private = []
    for b in blocks:
        covering, stop = _readable(b.hva, b.hva + b.size, maps)
        if stop < b.hva + b.size:
            raise GuestMemoryError(
                f"guest RAM at {b.gpa:#x} (host {b.hva:#x}, {b.size:#x} bytes) "
                f"is not mapped readable in QEMU at {stop:#x}"
            )
        private.append(all(m.perms.endswith("p") and not m.path for m in covering))
    return private


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


class MemorySource(Protocol):
    """Where QEMU's memory is read from: a live process (:class:`ProcessMemory`)
    or the core file of one. The RAM-map walk, the vCPU reader and the copy
    read through this alone."""

    def read(self, buf: "Buffer", length: int, address: int) -> memoryview: ...


class Populated(Protocol):
    """Which pages of a memory source hold data (:class:`PageMap` for a process)."""

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, bool]]: ...


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

    def read(self, buf: Buffer, length: int, address: int) -> memoryview:
        """Fill the first ``length`` bytes of ``buf`` from ``address``; return them."""
        done = 0
        while done < length:
            n = self._read_some(buf, done, length - done, address + done)
            if n == 0:
                raise DumpIOError(f"reading QEMU memory at {address + done:#x}: unexpected end")
            done += n
        return buf.view[:length]

    def _read_some(self, buf: Buffer, offset: int, length: int, address: int) -> int:
        if self._use_syscall:
            local = _IOVec(buf.address + offset, length)
            remote = _IOVec(address, length)
            n: int = _process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote),
                                       1, 0)
            if n >= 0:
                return n
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                self._fail(err, address)
            self._use_syscall = False
        try:
            return os.preadv(self._fd, [buf.view[offset : offset + length]], address)
        except OSError as e:
            self._fail(e.errno or errno.EIO, address)

    def _fail(self, err: int, address: int) -> typing.NoReturn:
        if err == errno.ESRCH or not proc.alive(self.pid):
            raise ProcessNotFound(f"QEMU (PID {self.pid}) exited during the dump")
        raise DumpIOError(f"reading QEMU memory at {address:#x}: {os.strerror(err)}")

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
# "swapped". The byte holding them, mapped to 1 when either is set:
_PM_FLAGS_BYTE = 7 if sys.byteorder == "little" else 0
_PM_POPULATED = bytes(1 if b & 0xC0 else 0 for b in range(256))


class PageMap:
    """Which pages of a process have ever been populated, from ``/proc/PID/pagemap``."""

    WINDOW = 32768  # pages looked up per read (128 MiB of 4 KiB pages)

    def __init__(self, pid: int) -> None:
        self._fd = proc.open_fd(pid, "pagemap", "read the page map of")

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(offset, length, populated)`` runs covering ``[address, address + size)``.

        ``address`` and ``size`` are page-aligned. The work is per run, not per page.
        """
        first, count = address // PAGE_SIZE, size // PAGE_SIZE
        run_start, run_populated = 0, None
        for base in range(0, count, self.WINDOW):
            n = min(self.WINDOW, count - base)
            entries = os.pread(self._fd, n * _PM_ENTRY, (first + base) * _PM_ENTRY)
            if len(entries) != n * _PM_ENTRY:
                raise DumpIOError(f"short read of the page map at {address:#x}")
            flags = entries[_PM_FLAGS_BYTE::_PM_ENTRY].translate(_PM_POPULATED)
            pos = 0
            while pos < n:
                populated = flags[pos] == 1
                end = flags.find(b"\0" if populated else b"\1", pos)
                end = n if end < 0 else end
                if populated != run_populated:
                    if run_populated is not None:
                        yield (run_start * PAGE_SIZE, (base + pos - run_start) * PAGE_SIZE,
                               run_populated)
                    run_start, run_populated = base + pos, populated
                pos = end
        if run_populated is not None:
            yield run_start * PAGE_SIZE, (count - run_start) * PAGE_SIZE, run_populated

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "PageMap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
