"""``livedump dmesg``: the guest kernel's log, read from the running VM.

No vmcore is written and no vmlinux is needed: the VM's RAM is mapped as
for a dump, the kernel's VMCOREINFO is found in it, and the log is read by
the layouts VMCOREINFO gives (:mod:`livedump.guest.printk`). The guest runs
on meanwhile (records are checked by their own states and sequence numbers);
``--pause`` holds it for an exact read, as a dump does.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from livedump.errors import GuestKernelError, ProcessNotFound
from livedump.guest.kernel import Kernel
from livedump.guest.memory import Found, GuestMemory, SeveralKernels, find_vmcoreinfo
from livedump.guest.printk import Log, Record, open_log
from livedump.proc import alive
from livedump.transfer.memory import PageMap, ProcessMemory, check_blocks, read_maps
from livedump.vm.guardian import STALL_TIMEOUT
from livedump.vm.lock import VMLock
from livedump.vm.process import Address
from livedump.vm.session import Session, open_session
from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import coalesce
from livedump.vmcore.notes import QemuNotes
from livedump.vmcore.x86_notes import x86_page_tables

FOLLOW_INTERVAL = 0.5  # seconds between looks at the log's head while following


@dataclass
class Target:
    """Which VM, and how to reach it: as for a dump."""

    pid: int | None = None
    qmp: Address | None = None
    domain: str | None = None
    connect: str | None = None
    via: str = "auto"
    debug_file: str | None = None
    qmp_timeout: float = 3.0
    stall_timeout: float = STALL_TIMEOUT

    def open(self) -> Session:
        return open_session(self.pid, self.qmp, self.via, self.qmp_timeout, self.debug_file,
                            self.domain, self.connect, self.stall_timeout)


class Guest:
    """A VM's guest kernel, found in its RAM, and its log: opened with the VM's
    session, which stays open (for a pause, or the monitor's events)."""

    def __init__(self, session: Session, pause: bool = False) -> None:
        """Map the VM's RAM and find its kernel; ``pause`` allows holding the VM
        to tell which kernel runs, should a reboot have left two."""
        self.session = session
        self.pid = session.pid
        self._stack = contextlib.ExitStack()
        try:
            self.memory = self._stack.enter_context(ProcessMemory(self.pid))
            pagemap = self._stack.enter_context(PageMap(self.pid))
            prepared = session.prepare()
            ram = prepared if prepared is not None else session.ranges(self.memory, None)
            blocks = coalesce(ram.ranges)
            private = check_blocks(blocks, read_maps(self.pid))
            self.guest = GuestMemory(self.memory, blocks)
            self.arch = arches.for_target(session.target_arch()).arch
            self._pagemap, self._private = pagemap, private
            self.log = self._open(pause)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, pause: bool) -> Log:
        """The log of the kernel whose VMCOREINFO is in guest RAM; where a reboot
        left an earlier kernel's there too, of the one the vCPUs run on (their
        registers are known only inside a pause)."""
        try:
            found = self._find(None)
        except SeveralKernels:
            if not pause:
                raise
            with VMLock(self.pid), self.session.hold(True):
                found = self._find(self.roots())
        self.vmcoreinfo_gpa = found.gpa
        self.kernel = Kernel(found.entries, self.arch, self.guest.read)
        return open_log(self.kernel)

    def _find(self, roots: list[int] | None) -> Found:
        return find_vmcoreinfo(self.guest, self._pagemap, self._private, self.arch, roots)

    def read(self, pause: bool) -> list[Record]:
        """Every record of the log: read while the guest runs, or (``pause``) with
        it held as a dump holds it."""
        if not pause:
            return self.log.records()
        with VMLock(self.pid), self.session.hold(True):
            return self.log.records()

    def roots(self) -> list[int]:
        """The vCPUs' page-table roots, inside a hold: which kernel runs."""
        cpu = self.session.cpu_notes(self.memory, self.guest.blocks)
        return x86_page_tables(cpu) if isinstance(cpu, QemuNotes) else []

    def close(self) -> None:
        self._stack.close()


def read_log(target: Target, pause: bool, emit: Callable[[list[Record]], None],
             follow: bool = False) -> None:
    """Emit the guest kernel's log; with ``follow``, then every new record, until
    interrupted or QEMU exits."""
    session = target.open()
    try:
        guest = Guest(session, pause)
        try:
            records = guest.read(pause)
            emit(records)
            if follow:
                _follow(guest, guest.log.position(records), emit)
        finally:
            guest.close()
    except GuestKernelError:
        if not alive(session.pid):
            raise ProcessNotFound(f"QEMU (PID {session.pid}) exited") from None
        raise
    finally:
        session.close()


def _follow(guest: Guest, position: int | None,
            emit: Callable[[list[Record]], None]) -> None:
    """Emit each record logged after ``position``, once it is final."""
    for _ in _ticks():
        if not alive(guest.pid):
            raise ProcessNotFound(f"QEMU (PID {guest.pid}) exited")
        if not guest.log.moved():
            continue
        new = guest.log.records(after=position)
        # A record still open (no newline yet) is printed once finalized.
        final = [i for i, r in enumerate(new) if r.final]
        done = new[: final[-1] + 1] if final else []
        if done:
            emit(done)
            position = guest.log.position(done)


def _ticks() -> Iterator[None]:
    while True:
        time.sleep(FOLLOW_INTERVAL)
        yield None
