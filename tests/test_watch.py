"""What ``livedump watch`` takes for a dying kernel, and where its vmcores go."""

import pytest

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
