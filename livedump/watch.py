"""``livedump watch``: wait for the guest to die, and take a vmcore when it does.

Waiting costs the host next to nothing: once a second, one small read of
the guest kernel's log head (the log itself only when it moved) and, where
the VM has a QMP monitor, one ``query-status``, whose exchange also
delivers QEMU's events. A vmcore is taken (into DIR, named for the VM and
the time) on QEMU's ``GUEST_PANICKED`` event (a pvpanic device), or when a
panic, oops, hung-task or lockup report appears in the log: once the log
has settled, so the whole report is in it (a panic's or an oops's once its
closing line is in, whatever pauses the guest took while writing it). The
dump is the ordinary one
(it pauses and resumes only what it paused), and watching goes on.
"""

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from livedump.dmesg import REBOOT_CHECK, Guest, Target
from livedump.dump import Request, Summary, dump
from livedump.errors import GuestKernelError, LivedumpError, ProcessNotFound, UsageError
from livedump.guest.printk import Record
from livedump.proc import alive
from livedump.qmp.session import MonitoredSession
from livedump.qmp.transport import QMPTransport
from livedump.vm.session import Session

INTERVAL = 1.0  # seconds between looks
SETTLE = 1.0  # a report is complete once the log is quiet this long...
SETTLE_MAX = 15.0  # ...or after this long at most

# The line that closes the report of a panic or an oops: until it is logged,
# a quiet log only means the guest's vCPU was not running.
CLOSING = re.compile(rb"^---\[ end (Kernel panic|trace)", re.MULTILINE)
CLOSED_KINDS = ("panic", "oops", "pvpanic")

# The first line of each report, as the kernel words it.
REPORTS = (
    ("panic", re.compile(rb"^Kernel panic - not syncing")),
    ("oops", re.compile(rb"^(Oops: |BUG: unable to handle|BUG: kernel NULL pointer|"
                        rb"kernel BUG at |general protection fault)")),
    ("hung task", re.compile(rb"^INFO: task .* blocked for more than \d+ seconds")),
    ("soft lockup", re.compile(rb"^watchdog: BUG: soft lockup")),
    ("hard lockup", re.compile(rb"Watchdog detected hard LOCKUP")),
)


@dataclass(frozen=True)
class Trigger:
    """Why a vmcore is taken."""

    kind: str  # "pvpanic", or one of REPORTS'
    detail: str  # the event, or the log line


def closes(records: list[Record]) -> bool:
    """Whether ``records`` hold the closing line of a panic's or an oops's report."""
    return any(CLOSING.search(r.text) for r in records)


def triggered_by(records: list[Record]) -> Trigger | None:
    """The first report of a dying kernel among ``records``."""
    for record in records:
        for kind, pattern in REPORTS:
            if pattern.search(record.text):
                line = record.text.split(b"\n", 1)[0].decode("utf-8", "replace")
                return Trigger(kind, f"kernel log: {line}")
    return None


@dataclass
class Taken:
    """A vmcore watch took, or the error that kept it from one."""

    trigger: Trigger
    summary: Summary | None = None
    error: LivedumpError | None = None


def vmcore_path(directory: Path, name: str, now: float | None = None) -> Path:
    """``DIR/NAME-YYYYmmddTHHMMSSZ.vmcore`` (``-2``... if taken within one second)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "vm"
    path = directory / f"{safe}-{stamp}.vmcore"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{safe}-{stamp}-{n}.vmcore"
    return path


class Watch:
    """One VM watched: its kernel log followed, its monitor's events heard."""

    def __init__(self, target: Target, directory: Path, request: Request,
                 say: Callable[[str], None]) -> None:
        if not directory.is_dir():
            raise UsageError(f"{directory} is not a directory")
        self.target, self.directory, self.request, self.say = target, directory, request, say
        self.session: Session | None = None
        self.guest: Guest | None = None
        self.position: int | None = None
        self.status: str | None = None
        self.name = target.domain
        self.closed = False  # whether the records last read closed a report
        self._checked = time.monotonic()  # when the running kernel was last asked for

    def open(self) -> None:
        """Reach the VM, find its kernel, and start after the log's present end."""
        self.session = self.target.open()
        self.name = self.name or self._vm_name()
        self.status = self._status()
        try:
            self.guest = Guest(self.session)
            self.position = self.guest.log.position(self.guest.log.records())
        except GuestKernelError as e:
            self.guest = None  # Events only, until a kernel is found.
            self.say(f"not reading the guest kernel's log ({e}); watching QEMU's events")

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        if self.session is not None:
            self.session.close()
            self.session = None

    def wait(self) -> Trigger:
        """Sleep until the guest dies; what said so."""
        while True:
            time.sleep(INTERVAL)
            assert self.session is not None
            if not alive(self.session.pid):
                raise ProcessNotFound(f"QEMU (PID {self.session.pid}) exited")
            trigger = self._event() or self._log()
            if trigger is not None:
                return trigger

    def take(self, trigger: Trigger) -> Taken:
        """A vmcore for ``trigger``, once the log settled; the VM reached afresh after."""
        trigger = self._settle(trigger)
        assert self.session is not None
        pid = self.session.pid
        # A QMP monitor serves one client: the dump's own session needs it.
        self.close()
        path = vmcore_path(self.directory, self.name or f"qemu-{pid}")
        request = replace(self.request, output=str(path), qmp=self.target.qmp,
                          pid=None if self.target.domain else self.target.pid or pid,
                          domain=self.target.domain)
        try:
            taken = Taken(trigger, summary=dump(request))
        except LivedumpError as e:
            taken = Taken(trigger, error=e)
        if not alive(pid):
            raise ProcessNotFound(f"QEMU (PID {pid}) exited")
        self.open()
        return taken

    def _settle(self, trigger: Trigger) -> Trigger:
        """Follow the log until it is quiet, as the report is still being written;
        ``trigger``, with whatever else said the guest died meanwhile."""
        quiet_since = started = time.monotonic()
        closing = trigger.kind in CLOSED_KINDS and self.guest is not None
        closed = self.closed and trigger.kind != "pvpanic"  # Read with the trigger.
        while time.monotonic() - started < SETTLE_MAX and (
                time.monotonic() - quiet_since < SETTLE or (closing and not closed)):
            time.sleep(0.2)
            more = self._event() if trigger.kind != "pvpanic" else None
            with contextlib.suppress(GuestKernelError):
                if self.guest is not None and self.guest.log.moved():
                    new = self.guest.log.records(after=self.position)
                    self.position = self.guest.log.position(new) if new else self.position
                    quiet_since = time.monotonic()
                    closed = closed or closes(new)
                    if trigger.kind == "pvpanic":
                        more = triggered_by(new)
            if more is not None and more.kind != trigger.kind:
                trigger = Trigger(trigger.kind, f"{trigger.detail}; then {more.detail}")
        return trigger

    def _event(self) -> Trigger | None:
        """GUEST_PANICKED among QEMU's events, or a status that turned guest-panicked."""
        before, self.status = self.status, self._status()
        transport = self._transport()
        events = transport.events() if transport is not None else []
        for event in events:
            if event.get("event") == "GUEST_PANICKED":
                data = event.get("data")
                action = data.get("action") if isinstance(data, dict) else None
                return Trigger("pvpanic", f"QEMU's GUEST_PANICKED event (action {action})")
        if self.status == "guest-panicked" and before != "guest-panicked":
            return Trigger("pvpanic", "QEMU's status turned guest-panicked")
        return None

    def _log(self) -> Trigger | None:
        if self.guest is None:
            return None
        try:
            if time.monotonic() - self._checked > REBOOT_CHECK:
                self._checked = time.monotonic()
                if self.guest.still_runs() is False:
                    self.guest.refind()
                    self.position = self.guest.log.position(self.guest.log.records())
                    self.say(f"the guest rebooted: watching the log of Linux "
                             f"{self.guest.kernel.release}")
                    return None
            if not self.guest.log.moved():
                return None
            new = self.guest.log.records(after=self.position)
        except GuestKernelError as e:
            # A reboot moves the kernel: find it again.
            self.say(f"the guest kernel's log became unreadable ({e}); looking again")
            self.guest.close()
            self.guest = None
            with contextlib.suppress(GuestKernelError):
                assert self.session is not None
                self.guest = Guest(self.session)
                self.position = self.guest.log.position(self.guest.log.records())
            return None
        if new:
            self.position = self.guest.log.position(new)
            self.closed = closes(new)
        return triggered_by(new)

    def _transport(self) -> QMPTransport | None:
        session = self.session
        if isinstance(session, MonitoredSession) and isinstance(session.monitor.transport,
                                                                QMPTransport):
            return session.monitor.transport
        return None

    def _status(self) -> str | None:
        """QEMU's run state, where a monitor tells it."""
        if not isinstance(self.session, MonitoredSession):
            return None
        with contextlib.suppress(LivedumpError):
            reply = self.session.monitor.transport.execute("query-status")
            if isinstance(reply, dict) and isinstance(reply.get("status"), str):
                return str(reply["status"])
        return None

    def _vm_name(self) -> str | None:
        """The name QEMU was given (``-name``), where a monitor tells it."""
        if not isinstance(self.session, MonitoredSession):
            return None
        with contextlib.suppress(LivedumpError):
            reply = self.session.monitor.transport.execute("query-name")
            if isinstance(reply, dict) and isinstance(reply.get("name"), str):
                return str(reply["name"])
        return None


def watch(target: Target, directory: Path, request: Request, once: bool,
          say: Callable[[str], None], report: Callable[[Taken], None]) -> int:
    """Watch until interrupted (or, ``once``, until one vmcore was attempted); the
    exit status: 0, or the failed dump's code with ``once``."""
    w = Watch(target, directory, request, say)
    w.open()
    try:
        assert w.session is not None
        kernel = (f"Linux {w.guest.kernel.release}'s {w.guest.log.kind}"
                  if w.guest is not None else "no kernel log")
        say(f"watching {w.name or 'QEMU'} (PID {w.session.pid}): {kernel}, "
            f"{'QMP events' if w._transport() else 'no QMP events'}; vmcores into "
            f"{os.fspath(directory)}")
        while True:
            taken = w.take(w.wait())
            report(taken)
            if once:
                return 0 if taken.error is None else taken.error.exit_code
    finally:
        w.close()
