"""``--live`` against real QEMU: a vmcore of one instant, from QEMU's background snapshot.

The guests run tiny firmwares (``integration.firmware``): one halts at
once, so its memory is the same whenever it is read and QEMU's own dump of
it is the reference; one counts forever into two pages, so a vmcore shows
whether both were read at the same instant; one writes its memory all the
time, so it would block on any page a snapshot left write-protected.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import livedump
from .counting import wait_counting
from .firmware import COUNTER_FIRST, COUNTER_SECOND
from .health import assert_whole
from .vm import COUNTING_PC, HALTING_PC, SWEEPING_PC, VM, Marker, kvm_usable, pause_of
from .vmcore import first_difference, identity, read_phys

ACCELS = ["tcg"] + (["kvm"] if kvm_usable() else [])
# 512 MiB below 4 GiB and 128 MiB above it.
SPLIT = dict(machine="q35,max-ram-below-4g=512M", memory="640M")
MARKERS = [
    Marker(0x0010_0000, b"livedump --live marker: 1 MiB"),
    Marker(0x1000_0000, os.urandom(64 << 10)),
    Marker(0x1_0000_0000, b"livedump --live marker: first byte above 4 GiB"),
    Marker(0x1_07FF_F000, b"livedump --live marker: last page"),
]
# Set by "the user" before each dump, to be found as they were afterwards.
USER_CAPABILITIES = {"xbzrle": True, "events": True}


def settings(vm: VM) -> tuple[dict, dict]:
    capabilities = {c["capability"]: c["state"] for c in vm.command("query-migrate-capabilities")}
    return capabilities, vm.command("query-migrate-parameters")


def set_user_capabilities(vm: VM) -> tuple[dict, dict]:
    vm.command("migrate-set-capabilities", capabilities=[
        {"capability": name, "state": state} for name, state in USER_CAPABILITIES.items()])
    return settings(vm)


def counters(vmcore: Path) -> tuple[int, int]:
    """The counting firmware's two copies of its count, first written first."""
    return (struct.unpack("<I", read_phys(vmcore, COUNTER_FIRST, 4))[0],
            struct.unpack("<I", read_phys(vmcore, COUNTER_SECOND, 4))[0])


@pytest.mark.parametrize("accel", ACCELS)
def test_live_vmcore_equals_qemu_dump(scratch, qemu, accel):
    with VM(**SPLIT, markers=MARKERS, accel=accel, platform=HALTING_PC, qemu=qemu) as vm:
        vm.wait_running(0.5)
        before = set_user_capabilities(vm)
        vm.events()
        ours, theirs = scratch / "live.vmcore", scratch / "qemu.vmcore"
        r = livedump("--pid", str(vm.pid), "--live", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["live"] is True and report["paused"] is True
        assert 0 < report["pause_seconds"] < report["wall_seconds"]
        assert vm.status() == "running"
        events = vm.event_log()
        names = [e["event"] for e in events]
        assert "STOP" in names and "RESUME" in names[names.index("STOP"):]
        # QEMU's own STOP and RESUME say how long the guest was held: within
        # the pause livedump reports (on x86 that pause is QEMU's, from the same
        # events, rounded to the microsecond).
        assert 0 < pause_of(events) <= report["pause_seconds"] + 1e-6
        assert settings(vm) == before
        assert vm.command("query-migrate")["status"] == "completed"

        vm.own_dump(theirs)
        assert first_difference(ours, theirs) is None
        assert identity(ours) == identity(theirs)
        for m in MARKERS:
            assert read_phys(ours, m.gpa, len(m.data)) == m.data, hex(m.gpa)
        assert os.stat(ours).st_blocks * 512 < 8 << 20  # Zero pages are holes.


def test_live_on_a_paused_vm_takes_the_normal_way(scratch, qemu):
    with VM(memory="256M", markers=MARKERS[:1], platform=HALTING_PC, qemu=qemu) as vm:
        vm.command("stop")
        before = settings(vm)
        out = scratch / "p.vmcore"
        r = livedump("--pid", str(vm.pid), "--live", "--json", str(out))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["live"] is False
        assert vm.status() == "paused"
        assert "status" not in vm.command("query-migrate")  # No migration was started.
        assert settings(vm) == before
        assert read_phys(out, MARKERS[0].gpa, len(MARKERS[0].data)) == MARKERS[0].data


@pytest.mark.parametrize("accel", ACCELS)
def test_live_is_one_instant_and_no_pause_is_not(scratch, qemu, accel):
    with VM(memory="128M", accel=accel, platform=COUNTING_PC, qemu=qemu) as vm:
        vm.wait_running(0.5)
        wait_counting(vm)
        out = scratch / "c.vmcore"
        for _ in range(2):
            r = livedump("--pid", str(vm.pid), "--live", "--force", str(out))
            assert r.returncode == 0, r.stderr
            first, second = counters(out)
            assert first > 0 and first - second in (0, 1), (first, second)
        # Read while the guest runs, the second copy is read later than the
        # first, and has moved on. A vCPU thread that is not scheduled while
        # the megabyte between them is copied makes a read look consistent:
        # on a nested-KVM host many do, and on a loaded one most, so up to 200
        # tries (a slow host gets as many), within 10 minutes.
        tries, deadline = 0, time.monotonic() + 600
        while True:
            r = livedump("--pid", str(vm.pid), "--no-pause", "--force", str(out))
            assert r.returncode == 0, r.stderr
            first, second = counters(out)
            tries += 1
            if first - second not in (0, 1):
                break
            if tries >= 200 or time.monotonic() > deadline:
                pytest.fail(f"all {tries} --no-pause vmcores looked consistent")
        assert vm.status() == "running"


def test_live_refusals_leave_the_vm_as_it_was(scratch, qemu):
    out = scratch / "n.vmcore"
    with VM(memory="128M", platform=HALTING_PC, qemu=qemu) as vm:
        r = livedump("--pid", str(vm.pid), "--live", "-", stdout=subprocess.DEVNULL)
        assert r.returncode == 2 and b"--live" in r.stderr
        r = livedump("--pid", str(vm.pid), "--live", "--no-pause", str(out))
        assert r.returncode == 2

        # Someone else's migration is under way (into a pipe nobody reads, so it
        # stays so): --live cannot start one.
        before = settings(vm)
        reader, writer = os.pipe()
        try:
            vm.qmp.send_fd_scm(writer)
            vm.command("getfd", fdname="elsewhere")
            vm.command("migrate", uri="fd:elsewhere")
            # It may still be in "setup" for a while on a slow host.
            deadline = time.monotonic() + 60
            while vm.command("query-migrate")["status"] != "active":
                assert time.monotonic() < deadline, vm.command("query-migrate")
                time.sleep(0.05)
            r = livedump("--pid", str(vm.pid), "--live", str(out))
            assert r.returncode == 15
            assert b"a migration is under way on this VM (active)" in r.stderr
            assert vm.command("query-migrate")["status"] == "active"
            assert settings(vm) == before
            assert vm.status() == "running"
        finally:
            os.close(writer)
            os.close(reader)  # QEMU's writes fail: its migration ends.
    assert not os.listdir(scratch)


def test_memory_userfaultfd_cannot_protect_is_refused(scratch, qemu, tmp_path_factory):
    # Guest RAM in a file on a disk filesystem (not tmpfs, not hugetlbfs).
    backing = Path("/var/tmp") / f"livedump-ram-{os.getpid()}"
    try:
        with VM(memory="128M", platform=HALTING_PC, qemu=qemu, extra=[
                "-object", f"memory-backend-file,id=ram0,size=128M,mem-path={backing},share=on",
                "-machine", "memory-backend=ram0"]) as vm:
            before = set_user_capabilities(vm)
            r = livedump("--pid", str(vm.pid), "--live", str(scratch / "n.vmcore"))
            assert r.returncode == 15
            assert r.stderr.startswith(b"livedump: QEMU cannot take a background snapshot")
            assert vm.status() == "running"
            assert settings(vm) == before
            assert "status" not in vm.command("query-migrate")
    finally:
        backing.unlink(missing_ok=True)
    assert not os.listdir(scratch)


def live_args(vm: VM, out: Path, *options: str) -> list[str]:
    return ["--pid", str(vm.pid), "--live", *options, str(out)]


def start_live(vm: VM, out: Path, *options: str) -> subprocess.Popen:
    """livedump --live in the background, returned once it streams with the guest running."""
    proc = subprocess.Popen([sys.executable, "-m", "livedump", *live_args(vm, out, *options)],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while (vm.command("query-migrate").get("status") != "active"
           or vm.status() != "running"):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the snapshot never became active"
        time.sleep(0.005)
    return proc


# Large enough (4 GiB of zero pages) that the stream lasts a few seconds.
BIG = dict(machine="q35,max-ram-below-4g=2G", memory="4G", platform=HALTING_PC)


def test_cancelled_snapshot_fails_cleanly(scratch, qemu):
    with VM(**BIG, qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        proc = start_live(vm, scratch / "c.vmcore")
        try:
            vm.command("migrate_cancel")
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 15, err
        assert b"migration stream ended early" in err and b"cancelled" in err
        assert vm.status() == "running"
        assert settings(vm) == before
    assert not os.listdir(scratch)


# A guest that writes its memory all the time, 2 GiB and mostly untouched, so
# that the stream lasts long enough to cut.
SWEEPING = dict(machine="q35", memory="2G", platform=SWEEPING_PC)


def assert_left_whole(vm: VM, before: tuple[dict, dict], scratch: Path) -> None:
    """After a --live dump, however it ended: the snapshot ran to its end, the
    settings are as before, no page is left write-protected, the guest counts
    on, and no file is left."""
    assert_whole(vm)
    assert vm.command("query-migrate")["status"] == "completed"
    assert settings(vm) == before
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_cut_mid_stream_the_snapshot_still_ends(scratch, qemu, accel, sig):
    """However livedump ends mid-stream, the snapshot is read to its end (by
    livedump, or by its guardian), never cancelled: QEMU 7.2 lifts its write
    protection only from a snapshot that completes."""
    with VM(**SWEEPING, accel=accel, qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        proc = start_live(vm, scratch / "i.vmcore")
        try:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)  # Until the guardian is done too.
        finally:
            proc.kill()
        if sig == signal.SIGKILL:
            assert proc.returncode == -sig
            assert b"its guardian" in err, err
        else:
            assert proc.returncode == 128 + sig
            assert err == f"livedump: interrupted by {sig.name}\n".encode()
        assert_left_whole(vm, before, scratch)


# livedump, made to die by SIGKILL right after a monitor command returns: inside
# the pause, at a moment a test cannot hit from outside every time.
KILLED_AFTER = """
import os, signal, sys
from livedump import cli
from livedump.qmp import monitor
command = getattr(monitor.Monitor, sys.argv[1])
def killed(*args):
    command(*args)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(monitor.Monitor, sys.argv[1], killed)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("command", ["stop", "migrate"])
def test_sigkill_in_the_pause(scratch, qemu, accel, command):
    """Killed once the guest is paused (the pipe's write end is QEMU's, under its
    name), or once the snapshot is started (QEMU writes into the pipe). On x86
    only --arch makes livedump pause the guest itself (else QEMU's snapshot
    start is the only pause, and no 'stop' is sent)."""
    own_pause = ("--arch", "386") if command == "stop" else ()
    with VM(**SWEEPING, accel=accel, qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        vm.events()
        r = subprocess.run([sys.executable, "-c", KILLED_AFTER, command,
                            *live_args(vm, scratch / "p.vmcore", *own_pause)],
                           stderr=subprocess.PIPE, timeout=120)  # Until the guardian is done.
        assert r.returncode == -signal.SIGKILL
        assert r.stderr.startswith(b"livedump: died while "), r.stderr
        # (Once the snapshot is started, QEMU itself resumes the guest at its point.)
        if command == "stop":
            assert b"its guardian resumed the guest" in r.stderr, r.stderr
        assert "STOP" in vm.events()
        if command == "stop":  # No snapshot was started.
            assert "status" not in vm.command("query-migrate")
            assert settings(vm) == before
            assert_whole(vm)
            assert os.listdir(scratch) == []
        else:
            assert_left_whole(vm, before, scratch)


@pytest.mark.parametrize("accel", ACCELS)
def test_full_disk_the_snapshot_still_ends(small_disk, qemu, accel):
    # Random data: more than the disk has room for, whatever the guest's pace.
    with VM(**SWEEPING, accel=accel, markers=[Marker(0x1000_0000, os.urandom(32 << 20))],
            qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        r = livedump(*live_args(vm, small_disk / "x.vmcore"), timeout=120)
        assert r.returncode == 8, r.stderr
        assert r.stderr.startswith(b"livedump: writing ") and b"No space left" in r.stderr
        assert os.listdir(small_disk) == []
        assert_left_whole(vm, before, small_disk)


@pytest.mark.parametrize("accel", ACCELS)
def test_complete_snapshot_leaves_the_guest_whole(scratch, qemu, accel):
    with VM(**SWEEPING, accel=accel, qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        out = scratch / "w.vmcore"
        r = livedump(*live_args(vm, out, "--json"), timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["live"] is True
        out.unlink()
        assert_left_whole(vm, before, scratch)


def test_qemu_killed_mid_stream_exits_3(scratch, qemu):
    with VM(**SWEEPING, qemu=qemu) as vm:
        proc = start_live(vm, scratch / "q.vmcore")
        try:
            vm.process.kill()
            vm.process.wait()
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 3, err
        assert err == f"livedump: QEMU (PID {vm.pid}) exited during the dump\n".encode()
    assert os.listdir(scratch) == []
