"""What ``livedump watch`` takes for a dying kernel, and where its vmcores go."""

import time

import pytest

from livedump import watch
from livedump.errors import UsageError
from livedump.guest.printk import Record
from livedump.watch import Request, Target, Watch, triggered_by, vmcore_path


def record(text: bytes) -> Record:
    return Record(seq=1, ts_nsec=0, level=0, facility=0, caller=None, text=text)


@pytest.mark.parametrize("text, kind", [
    (b"Kernel panic - not syncing: NMI: Not continuing", "panic"),
    (b"Kernel panic - not syncing: sysrq triggered crash\n", "panic"),
    (b"BUG: kernel NULL pointer dereference, address: 0000000000000000", "oops"),
    (b"Oops: 0002 [#1] PREEMPT SMP NOPTI", "oops"),
    (b"kernel BUG at mm/slub.c:379!", "oops"),
    (b"general protection fault, probably for non-canonical address 0xdead: 0000", "oops"),
    (b"BUG: unable to handle page fault for address: ffffc90000000000", "oops"),
    (b"INFO: task kworker/0:1:12 blocked for more than 120 seconds.", "hung task"),
    (b"watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [a.out:123]", "soft lockup"),
    (b"NMI watchdog: Watchdog detected hard LOCKUP on cpu 1", "hard lockup"),
])
def test_reports_of_a_dying_kernel_trigger(text, kind):
    trigger = triggered_by([record(b"eth0: link up"), record(text), record(b"Oops: 0000")])
    assert trigger is not None and trigger.kind == kind
    assert trigger.detail == f"kernel log: {text.decode().splitlines()[0]}"


@pytest.mark.parametrize("text", [
    b"panic=0 set on the command line", b"Kernel command line: console=ttyS0 panic=0",
    b"LIVEDUMP-KMSG n=3", b"pstore: Registered efi as persistent store backend",
    b"test: not an Oops: just words", b"INFO: task done",
])
def test_ordinary_messages_do_not(text):
    assert triggered_by([record(text)]) is None


def test_vmcores_are_named_for_the_vm_and_the_time_and_never_clobber(tmp_path):
    now = 1_796_000_000.0  # 2026-11-30T00:53:20Z
    first = vmcore_path(tmp_path, "web server/1", now)
    assert first == tmp_path / "web_server_1-20261130T005320Z.vmcore"
    first.touch()
    assert vmcore_path(tmp_path, "web server/1", now).name == \
        "web_server_1-20261130T005320Z-2.vmcore"
    assert vmcore_path(tmp_path, "../..", now).name == "vm-20261130T005320Z.vmcore"


def test_the_directory_must_be_one(tmp_path):
    with pytest.raises(UsageError, match="is not a directory"):
        Watch(Target(pid=1), tmp_path / "missing", Request(output=""), print)


class _Log:
    """A kernel log whose records are logged at given seconds from now."""

    def __init__(self, *timed: tuple[float, bytes]) -> None:
        start = time.monotonic()
        self.timed = [(start + at, record(text)) for at, text in timed]
        self.read = 0

    def _logged(self) -> list:
        return [r for at, r in self.timed if at <= time.monotonic()]

    def moved(self) -> bool:
        return len(self._logged()) > self.read

    def records(self, after=None):
        return self._logged()[after or 0:]

    def position(self, records) -> int:
        self.read = self._logged().index(records[-1]) + 1
        return self.read


class _Guest:
    def __init__(self, log: _Log) -> None:
        self.log = log


def _watching(tmp_path, log: _Log) -> Watch:
    w = Watch(Target(pid=1), tmp_path, Request(output=""), print)
    w.guest, w.position = _Guest(log), 0  # type: ignore[assignment]
    return w


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(watch, "SETTLE", 0.3)


def test_a_panic_report_is_waited_for_to_its_closing_line_through_a_silence(tmp_path, quick):
    # The guest's vCPU not scheduled for longer than the log's quiet limit
    # in the middle of its panic report.
    log = _Log((1.0, b"CPU: 0 PID: 1 Comm: sh"),
               (1.2, b"---[ end Kernel panic - not syncing: sysrq triggered crash ]---"))
    w = _watching(tmp_path, log)
    w._settle(watch.Trigger("panic", "kernel log: Kernel panic - not syncing"))
    assert log.read == 2


@pytest.mark.parametrize("kind", ["oops", "pvpanic"])
def test_other_closed_reports_are_waited_for_too(tmp_path, quick, kind):
    log = _Log((0.8, b"---[ end trace 0000000000000000 ]---"))
    w = _watching(tmp_path, log)
    w._settle(watch.Trigger(kind, "a report"))
    assert log.read == 1


def test_a_report_closed_when_it_was_found_needs_only_a_quiet_log(tmp_path, quick):
    log = _Log((5.0, b"long after"))
    w = _watching(tmp_path, log)
    w.closed = True
    started = time.monotonic()
    w._settle(watch.Trigger("panic", "kernel log: Kernel panic - not syncing"))
    assert time.monotonic() - started < 2 and log.read == 0


def test_a_report_with_no_closing_line_needs_only_a_quiet_log(tmp_path, quick):
    log = _Log((5.0, b"long after"))
    w = _watching(tmp_path, log)
    started = time.monotonic()
    w._settle(watch.Trigger("hung task", "kernel log: INFO: task"))
    assert time.monotonic() - started < 2 and log.read == 0
