"""A libvirt domain: paused by libvirt, mapped through libvirt's monitor pass-through."""

import dataclasses

from livedump.libvirt.domain import Domain, PassThrough
from livedump.qmp import notes
from livedump.qmp.monitor import Monitor
from livedump.qmp.session import MonitoredSession
from livedump.vm.guardian import STALL_TIMEOUT, Guardian
from livedump.vm.pause import Control
from livedump.vmcore.notes import QemuNotes


class LibvirtSession(MonitoredSession):
    """A libvirt domain: paused by libvirt, mapped through libvirt's monitor pass-through.

    libvirt holds QEMU's only monitor, so the monitor commands go through
    libvirt (which marks the domain "tainted: custom-monitor"), and libvirt
    suspends and resumes the guest, so its view of the domain stays true.
    """

    via = "libvirt"
    header_source = "libvirt's memory-only dump"

    def __init__(self, domain: Domain, stall: float = STALL_TIMEOUT) -> None:
        super().__init__(Monitor(PassThrough(domain)), domain.pid,
                         f"domain {domain.name} at {domain.uri}, monitor pass-through "
                         "(libvirt now marks the domain tainted: custom-monitor)", stall)
        self.domain = domain
        try:
            # The first command: does the monitor answer (a hung QEMU's does not)?
            self._arch = self.monitor.target_arch()
        except BaseException:
            self.close()
            raise

    def target_arch(self) -> str:
        return self._arch

    def control(self) -> Control:
        return self.domain

    def guardian(self) -> Guardian:
        return Guardian.over_libvirt(self.domain.uri, self.domain.uuid, self.stall)

    def qemu_notes(self, gpa: int) -> QemuNotes:
        # Never QEMU's dump-guest-memory through the pass-through: libvirtd 9.0
        # crashes on its completion event. libvirt's own dump, cut after the notes.
        return dataclasses.replace(notes.from_pipe(self.domain.dump_memory_only,
                                                   watch=self.watcher().fifo),
                                   source="libvirt's memory-only dump")

    def qemu_header(self) -> bytes:
        return notes.header_from_pipe(self.domain.dump_memory_only, watch=self.watcher().fifo)
