"""A VM with no usable monitor: its threads frozen with ptrace, its RAM map and
vCPU state read from QEMU's own structures, through QEMU's DWARF."""

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

from livedump.ptrace import cpu_state, dwarf, ram_map
from livedump.ptrace.freeze import frozen
from livedump.transfer.memory import MemorySource, read_maps
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Pause
from livedump.vm.process import qemu_executable
from livedump.vm.session import RamMap
from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import Block
from livedump.vmcore.notes import CpuNotes


class PtraceSession:
    """The VM with no monitor: threads frozen by ptrace, the map read via QEMU's DWARF."""

    via = "ptrace"

    def __init__(self, pid: int, debug_file: str | None, reason: str,
                 stall: float = STALL_TIMEOUT) -> None:
        self.pid = pid
        self.detail = reason
        self.stall = stall
        self.exe = qemu_executable(pid)
        self.layout = dwarf.qemu_layout(f"/proc/{pid}/exe", debug_file)
        self.bias = ram_map.load_bias(pid, self.layout, read_maps(pid))
        self._frozen = False
        self._guardian: Guardian | None = None

    def target_arch(self) -> str:
        return cpu_state.target_arch(self.exe, self.layout)

    def target_default(self, target: str) -> arches.TargetDefault:
        """What ``target`` implies without the CPU state (the CPU model is not
        read from QEMU's structures: on qemu-system-aarch64, AArch64 assumed)."""
        return arches.for_target(target)

    def prepare(self) -> None:
        return None  # QEMU may change its map until it is frozen.

    def hold(self, pause: bool) -> AbstractContextManager[Pause]:
        self._frozen = pause
        if pause:
            return self._freeze()
        return contextlib.nullcontext(Pause(was_running=True))

    @contextlib.contextmanager
    def _freeze(self) -> Iterator[Pause]:
        """QEMU frozen, its guardian told: should livedump stop (SIGSTOP, Ctrl-Z)
        with QEMU frozen, only its death lets QEMU go, and the guardian kills it."""
        guardian = self.watcher()
        guardian.paused()
        try:
            with frozen(self.pid) as pause:
                yield pause
        finally:
            guardian.resumed()

    def watcher(self) -> Guardian:
        """The session's guardian, started on first need."""
        if self._guardian is None:
            self._guardian = Guardian.over_ptrace(self.stall)
        return self._guardian

    def ranges(self, memory: MemorySource, prepared: RamMap | None) -> RamMap:
        with self._still():
            return RamMap(ram_map.guest_ranges(memory, self.layout, self.bias))

    def cpu_notes(self, memory: MemorySource, blocks: list[Block]) -> CpuNotes:
        with self._still():
            return cpu_state.notes(memory, self.layout, self.bias, blocks)

    def _still(self) -> AbstractContextManager[Pause]:
        """Frozen for a walk of QEMU's structures: already, or (--no-pause) just for it."""
        return contextlib.nullcontext(Pause(was_running=True)) if self._frozen \
            else self._freeze()

    def close(self) -> None:
        if self._guardian is not None:
            self._guardian.close()
