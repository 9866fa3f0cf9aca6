"""A QEMU that is gone, through the core file it left: its guest's vmcore.

With QEMU's default ``-machine dump-guest-core=on`` the guest's RAM is in
the core of a crashed (or ``gcore``'d) QEMU, beside the structures that
map it. The session finds the executable in the core (the auxiliary
vector's entry point, in a mapping the NT_FILE note names), its build-id in
the ELF header the core keeps of it, and QEMU's debug info as ptrace mode
does; then the RAM map and the vCPUs are read out of the core through the
same code as ptrace mode reads them out of a live QEMU
(:mod:`livedump.ptrace.ram_map`, :mod:`livedump.ptrace.cpu_state`), over a
:class:`CoreMemory` instead of the process. Nothing is held: a core cannot
change.
"""

import bisect
import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from livedump.coredump import elfcore
from livedump.coredump.elfcore import FileMapping, Header, Segment
from livedump.coredump.image import CoreBytes, ZstdCore, open_core
from livedump.errors import (
    CoreFileError,
    DebugInfoError,
    GuestMemoryError,
    NoGuestRam,
    NotQemu,
    UsageError,
)
from livedump.ptrace import cpu_state, ram_map
from livedump.ptrace.layout import QemuLayout, read_cached
from livedump.transfer.memory import Buffer, Mapping, MemorySource
from livedump.vm.guardian import Guardian
from livedump.vm.pause import Pause
from livedump.vm.session import RamMap
from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import Block
from livedump.vmcore.notes import CpuNotes

_ET_DYN = 3
_EXE_HEADER = 4096  # the ELF header and program headers are in the file's first page


class CoreMemory:
    """QEMU's memory as its core holds it: the PT_LOAD segments by address.

    What the core lacks (a mapping it did not dump, or memory outside any)
    is an error, never zeros: guessed bytes would make a wrong vmcore.
    """

    def __init__(self, data: CoreBytes, loads: list[Segment], path: str) -> None:
        self.data = data
        self.path = path
        self.loads = sorted((s for s in loads if s.memsz), key=lambda s: s.vaddr)
        self._starts = [s.vaddr for s in self.loads]

    def segment(self, address: int) -> Segment | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self.loads[i].vaddr + self.loads[i].memsz:
            return self.loads[i]
        return None

    def read(self, buf: Buffer, length: int, address: int,
             guest: Block | None = None) -> memoryview:
        view = buf.view[:length]
        done = 0
        while done < length:
            at = address + done
            s = self.segment(at)
            if s is None:
                raise GuestMemoryError(f"QEMU's memory at {at:#x} is not in the core")
            if at >= s.vaddr + s.filesz:
                raise GuestMemoryError(f"QEMU's memory at {at:#x} was not dumped into the "
                                       "core")
            n = min(length - done, s.vaddr + s.filesz - at)
            self.data.readinto(view[done : done + n], s.offset + at - s.vaddr)
            done += n
        return view

    def bytes_at(self, address: int, size: int) -> bytes:
        buf = Buffer(max(size, 1))
        return bytes(self.read(buf, size, address))

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, bool]]:
        """The populated runs, as :class:`~livedump.transfer.memory.PageMap` gives
        them: the core file's holes are pages the kernel found never populated,
        and a segment with no bytes in the file one never written (see
        :meth:`CoreSession.ranges`)."""
        done = 0
        while done < size:
            at = address + done
            s = self.segment(at)
            assert s is not None  # checked by the session before the copy
            if s.filesz == 0:
                n = min(size - done, s.vaddr + s.memsz - at)
                yield done, n, False
            else:
                n = min(size - done, s.vaddr + s.filesz - at)
                for offset, length, data in self.data.data_runs(s.offset + at - s.vaddr, n):
                    yield done + offset, length, data
            done += n

    def maps(self) -> list[Mapping]:
        """The core's memory as mappings: private, readable, and nothing else."""
        return [Mapping(s.vaddr, s.vaddr + (s.memsz if s.filesz == 0 else s.filesz), "r--p",
                        0, "") for s in self.loads]


class CoreSession:
    """The guest of a QEMU core file, mapped through QEMU's DWARF."""

    via = "core"

    def __init__(self, path: str, debug_file: str | None) -> None:
        self.path = path
        self.data = open_core(path)
        try:
            self._open(debug_file)
        except BaseException:
            self.data.close()
            raise

    def _open(self, debug_file: str | None) -> None:
        path, data = self.path, self.data
        header = elfcore.read_header(data.pread, path)
        if header.type != elfcore.ET_CORE:
            raise CoreFileError(f"{path} is an ELF file but not a core (type {header.type})")
        loads = [s for s in header.segments if s.type == elfcore.PT_LOAD]
        needed = max((s.offset + s.filesz for s in header.segments), default=0)
        if not isinstance(data, ZstdCore) and data.size < needed:
            raise CoreFileError(f"{path} is truncated: {data.size:#x} bytes, its segments "
                                f"need {needed:#x}")
        self.memory = CoreMemory(data, loads, path)
        notes = elfcore.read_notes(data.pread, header, path)
        self.pid, self.command = 0, ""
        files: list[FileMapping] = []
        aux: dict[int, int] = {}
        for name, n_type, desc in notes:
            if name != b"CORE":
                continue
            if n_type == elfcore.NT_PRPSINFO:
                self.pid, self.command = elfcore.prpsinfo(desc, header.bits, header.byteorder)
            elif n_type == elfcore.NT_FILE:
                files = elfcore.file_mappings(desc, header.bits, header.byteorder)
            elif n_type == elfcore.NT_AUXV:
                aux = elfcore.auxv(desc, header.bits, header.byteorder)
        self.exe = self._executable(files, aux)
        if isinstance(data, ZstdCore):  # A core of QEMU: worth a pass over it.
            data.keep([(s.offset, s.filesz) for s in loads])
        self.maps = [Mapping(f.start, f.end, "r--p", f.offset, f.path) for f in files]
        self.build_id, exe_header = self._exe_header(header)
        self.layout = self._layout(debug_file)
        self.bias = self._bias(exe_header)
        self.detail = (f"{path}, of QEMU PID {self.pid}" if self.pid else path) + \
            ", mapped through QEMU's debug info"

    def _executable(self, files: list[FileMapping], aux: dict[int, int]) -> str:
        """The path of the process's executable: the file mapped where its
        entry point is (or, with no auxiliary vector, the first file mapped)."""
        if not files:
            raise CoreFileError(f"{self.path} has no NT_FILE note: it does not say which "
                                "program it is a core of")
        entry = aux.get(elfcore.AT_ENTRY) or aux.get(elfcore.AT_PHDR)
        exe = next((f.path for f in files if entry is not None and f.start <= entry < f.end),
                   files[0].path)
        name = os.path.basename(exe.removesuffix(" (deleted)"))
        if not (name.startswith("qemu-system-") or name == "qemu-kvm"):
            raise NotQemu(f"{self.path} is a core of {exe}, not of a QEMU system emulator")
        return exe

    def _exe_header(self, core: Header) -> tuple[str | None, Header | None]:
        """The build-id of the executable, and its ELF header, from the copy of
        its first page the core keeps (None where it keeps none)."""
        start = next((m.start for m in self.maps if m.path == self.exe and m.offset == 0),
                     None)
        if start is None:
            return None, None

        def read(offset: int, size: int) -> bytes:
            return self.memory.bytes_at(start + offset, min(size, _EXE_HEADER - offset))

        try:
            header = elfcore.read_header(read, f"the header of {self.exe} in the core")
        except (CoreFileError, GuestMemoryError):
            return None, None
        bias = _exe_bias(header, self.exe, self.maps)
        for s in header.segments:
            if s.type != elfcore.PT_NOTE:
                continue
            with contextlib.suppress(GuestMemoryError):
                raw = self.memory.bytes_at(s.vaddr + bias, s.filesz)
                for name, n_type, desc in elfcore.iter_notes(raw, header.byteorder):
                    if name == b"GNU" and n_type == elfcore.NT_GNU_BUILD_ID:
                        return desc.hex(), header
        return None, header

    def _layout(self, debug_file: str | None) -> QemuLayout:
        """QEMU's layout for the build in the core: from the binary on disk if it
        is that build, else from ``--debug-file`` alone; another build is refused.
        A layout cached for the core's build-id is used as it is: then no ELF
        or DWARF code is even loaded (it takes long to import)."""
        if self.build_id is not None and debug_file is None:
            cached = read_cached(self.build_id)
            if cached is not None:
                return cached
        from livedump.ptrace import dwarf
        from livedump.ptrace.debuginfo import check_build_id, read_build_id

        on_disk = self.exe.removesuffix(" (deleted)")
        disk_id: str | None = None
        with contextlib.suppress(DebugInfoError, OSError):
            disk_id = read_build_id(on_disk)
        if self.build_id is None or disk_id == self.build_id:
            if disk_id is None and debug_file is None:
                raise DebugInfoError(f"cannot read {on_disk}, the QEMU of {self.path}: "
                                     "pass its debug info with --debug-file")
            if disk_id is not None:
                return dwarf.qemu_layout(on_disk, debug_file)
        if debug_file is None:
            raise DebugInfoError(
                f"{self.path} is a core of QEMU build-id {self.build_id}, but {on_disk} is "
                f"build-id {disk_id or 'unreadable'} (replaced since?): pass that build's "
                "debug info with --debug-file")
        # The debug file stands for the binary too: same build-id, symbols and header.
        return dwarf.qemu_layout(str(check_build_id(Path(debug_file), self.build_id)),
                                 debug_file)

    def _bias(self, exe_header: Header | None) -> int:
        if not self.layout.pie:
            return 0
        if exe_header is not None:
            return _exe_bias(exe_header, self.exe, self.maps)
        # The core kept no page of the binary (coredump_filter without ELF
        # headers): its program headers from the file, which the layout was
        # read from, so it is that build.
        on_disk = self.exe.removesuffix(" (deleted)")
        try:
            with open(on_disk, "rb") as f:
                header = elfcore.read_header(lambda at, n: os.pread(f.fileno(), n, at), on_disk)
        except (OSError, CoreFileError) as e:
            raise GuestMemoryError(f"{self.path} keeps no ELF header of {self.exe}, and the "
                                   f"file cannot be read ({e}): cannot tell where it was "
                                   "loaded") from None
        return _exe_bias(header, self.exe, self.maps)

    # -- the session, as the pipeline asks -------------------------------------------

    def target_arch(self) -> str:
        return cpu_state.target_arch(self.exe, self.layout)

    def target_default(self, target: str) -> arches.TargetDefault:
        """What ``target`` implies without the CPU state, as in ptrace mode."""
        return arches.for_target(target)

    def prepare(self) -> RamMap | None:
        return None

    def hold(self, pause: bool) -> AbstractContextManager[Pause]:
        return contextlib.nullcontext(Pause(was_running=False))  # A core cannot change.

    def ranges(self, memory: MemorySource, prepared: RamMap | None) -> RamMap:
        try:
            found = ram_map.guest_ranges(memory, self.layout, self.bias)
        except GuestMemoryError as e:
            raise GuestMemoryError(f"{e} (is {self.path} a core of this QEMU build?)") from None
        states = [self._dumped(r.hva, r.size) for r in found]
        if found and all(st != "dumped" for st in states):
            raise NoGuestRam(f"{self.path} holds none of the guest's RAM: QEMU ran with "
                             "-machine dump-guest-core=off (or its RAM was excluded from "
                             "the core)")
        for r, st in zip(found, states, strict=True):
            if st == "missing":
                raise NoGuestRam(f"{self.path} lacks the guest's RAM {r.name} at {r.gpa:#x} "
                                 f"({r.size:#x} bytes): excluded from the core, or cut short")
        # The kernel leaves out an anonymous mapping nobody ever wrote to: its
        # pages are all zeros (a ROM the firmware never used, say).
        unwritten = sorted({r.name for r, st in zip(found, states, strict=True)
                            if st == "empty"})
        if unwritten:
            self.detail += f"; never written, so not in the core, written as zeros: " \
                           f"{', '.join(unwritten)}"
        return RamMap(found)

    def _dumped(self, address: int, size: int) -> str:
        """Whether ``[address, address + size)`` is all in the core file
        (``"dumped"``), all in segments with no bytes in the file (``"empty"``),
        or partly outside any segment or its bytes (``"missing"``)."""
        end, kinds = address + size, set()
        while address < end:
            s = self.memory.segment(address)
            if s is None or (s.filesz and address >= s.vaddr + s.filesz):
                return "missing"
            kinds.add("empty" if s.filesz == 0 else "dumped")
            address = s.vaddr + (s.memsz if s.filesz == 0 else s.filesz)
        return kinds.pop() if len(kinds) == 1 else "missing"

    def cpu_notes(self, memory: MemorySource, blocks: list[Block]) -> CpuNotes:
        return cpu_state.notes(memory, self.layout, self.bias, blocks)

    def watcher(self) -> Guardian:
        raise UsageError("a core file has no VM to watch")

    def close(self) -> None:
        self.data.close()


def _exe_bias(header: Header, exe: str, maps: list[Mapping]) -> int:
    """Where the executable with ``header`` was loaded (0 unless position-independent)."""
    if header.type != _ET_DYN:
        return 0
    first = min((s for s in header.segments if s.type == elfcore.PT_LOAD),
                key=lambda s: s.vaddr, default=None)
    if first is None:
        raise GuestMemoryError(f"{exe} has no loadable segment")
    return ram_map.mapped_bias(first.offset, first.vaddr, first.align, exe, maps)
