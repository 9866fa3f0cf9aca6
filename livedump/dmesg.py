"""``livedump dmesg``: the guest kernel's log, read from the running VM.

No vmcore is written and no vmlinux is needed: the VM's RAM is mapped as
for a dump, the kernel's VMCOREINFO is found in it, and the log is read by
the layouts VMCOREINFO gives (:mod:`livedump.guest.printk`). The guest runs
on meanwhile (records are checked by their own states and sequence numbers);
``--pause`` holds it for an exact read, as a dump does.
"""

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from livedump.errors import GuestKernelError, LivedumpError, ProcessNotFound
from livedump.guest.kernel import Kernel
from livedump.guest.memory import Found, GuestMemory, SeveralKernels, find_vmcoreinfo, runs
from livedump.guest.printk import Log, Record, open_log
from livedump.proc import alive
from livedump.qmp.session import MonitoredSession
from livedump.transfer.memory import (
    BackingFiles,
    PageMap,
    ProcessMemory,
    check_blocks,
    read_maps,
)
from livedump.vm.guardian import STALL_TIMEOUT
from livedump.vm.lock import VMLock
from livedump.vm.process import Address
from livedump.vm.session import Session, open_session
from livedump.vmcore import arch as arches
from livedump.vmcore.blocks import coalesce
from livedump.vmcore.notes import QemuNotes
from livedump.vmcore.x86_notes import x86_page_tables

FOLLOW_INTERVAL = 0.5  # seconds between looks at the log's head while following
REBOOT_CHECK = 5.0  # seconds between asking the monitor which kernel the vCPUs run
_CR3 = re.compile(r"\bCR3=([0-9a-fA-F]+)")


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
            # Read as a dump reads: shared RAM through its file, so no page is created.
            files = self._stack.enter_context(BackingFiles(self.pid))
            spans = [files.spans(b, covering)
                     for b, covering in zip(blocks, check_blocks(blocks, read_maps(self.pid)),
                                            strict=True)]
            self.guest = GuestMemory(self.memory, blocks, spans, pagemap)
            self.arch = arches.for_target(session.target_arch()).arch
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
            roots = self.monitor_roots()
            if roots:
                found = self._find(roots)
            elif not pause:
                raise
            else:
                with VMLock(self.pid), self.session.hold(True):
                    found = self._find(self.roots())
        self.found = found
        self.kernel = Kernel(found.entries, self.arch, self.guest.read)
        return open_log(self.kernel)

    def _find(self, roots: list[int] | None) -> Found:
        return find_vmcoreinfo(self.guest, self.arch, roots)

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

    def monitor_roots(self) -> list[int]:
        """The vCPUs' page-table roots as the monitor shows them, the guest running
        on (``info registers``); none without a monitor."""
        if not isinstance(self.session, MonitoredSession):
            return []
        try:
            text = self.session.monitor.hmp("info registers -a")
        except LivedumpError:
            return []
        return [int(cr3, 16) for cr3 in _CR3.findall(text)]

    def still_runs(self) -> bool | None:
        """Whether the kernel found is the one the vCPUs run (a reboot starts
        another, whose log is elsewhere); None where the monitor cannot tell."""
        roots = self.monitor_roots()
        return runs(self.found.entries, self.arch, roots, self.guest) if roots else None

    def refind(self) -> None:
        """Find the running kernel again, and its log."""
        self.log = self._open(False)

    def close(self) -> None:
        self._stack.close()


def read_log(target: Target, pause: bool, emit: Callable[[list[Record]], None],
             follow: bool = False, say: Callable[[str], None] = print) -> None:
    """Emit the guest kernel's log; with ``follow``, then every new record, until
    interrupted or QEMU exits."""
    session = target.open()
    try:
        guest = Guest(session, pause)
        try:
            records = guest.read(pause)
            emit(records)
            if follow:
                _follow(guest, guest.log.position(records), emit, say)
        finally:
            guest.close()
    except GuestKernelError:
        if not alive(session.pid):
            raise ProcessNotFound(f"QEMU (PID {session.pid}) exited") from None
        raise
    finally:
        session.close()


def _follow(guest: Guest, position: int | None, emit: Callable[[list[Record]], None],
            say: Callable[[str], None]) -> None:
    """Emit each record logged after ``position``, once it is final; after a
    reboot, the new kernel's log from its start."""
    last_check = time.monotonic()
    lost: str | None = None  # why the log cannot be read now
    for _ in _ticks():
        if not alive(guest.pid):
            raise ProcessNotFound(f"QEMU (PID {guest.pid}) exited")
        try:
            check = time.monotonic() - last_check > REBOOT_CHECK
            if check:
                last_check = time.monotonic()
            if lost is not None or (check and guest.still_runs() is False):
                before = guest.found
                guest.refind()
                lost = None
                if guest.found != before:
                    say(f"following the log of the kernel now running (Linux "
                        f"{guest.kernel.release}): the guest rebooted")
                    position = None
            if position is not None and not guest.log.moved():
                continue
            new = guest.log.records(after=position)
        except GuestKernelError as e:
            if lost is None:
                say(f"the guest kernel's log cannot be read now ({e}); looking on")
            lost = str(e)
            continue
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
