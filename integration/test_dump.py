"""livedump against real QEMU: its vmcore must equal QEMU's own dump, byte for byte."""

import json
import os
import stat

import pytest

from .conftest import livedump
from .vm import VM, Marker, kvm_usable, pause_of
from .vmcore import first_difference, identity, loads, read_phys

GiB = 1 << 30

MARKERS = [
    Marker(0x0010_0000, b"livedump marker: 1 MiB"),
    Marker(0x1000_0000, os.urandom(64 << 10)),
    Marker(0x3E00_0000, b"livedump marker: 992 MiB, near the top of a 1 GiB guest"),
]
HIGH_MARKERS = [
    Marker(0x1_0000_0000, b"livedump marker: first byte above 4 GiB"),
    Marker(0x1_2345_6000, os.urandom(1 << 20)),
    Marker(0x1_BFFF_F000, b"livedump marker: last page of a 5 GiB q35"),
]

# (machine, memory, markers): a pc guest below 4 GiB, and a q35 guest whose
# RAM is split below and above 4 GiB.
GUESTS = {
    "pc-1G": ("pc", "1G", MARKERS, []),
    "q35-5G": ("q35", "5G", MARKERS[:2] + HIGH_MARKERS, ["-smp", "2"]),
    # Every page populated (and zero): zero detection, not the page map, makes holes.
    "pc-1G-prealloc": ("pc", "1G", MARKERS, [
        "-object", "memory-backend-ram,id=ram0,size=1G,prealloc=on",
        "-machine", "memory-backend=ram0"]),
    # Shared memory: untouched pages are the holes of its file, found there, not read.
    "pc-1G-memfd": ("pc", "1G", MARKERS, [
        "-object", "memory-backend-memfd,id=ram0,size=1G,share=on",
        "-machine", "memory-backend=ram0"]),
}
ACCELS = ["tcg"] + (["kvm"] if kvm_usable() else [])


def assert_markers(vmcore, markers):
    for m in markers:
        assert read_phys(vmcore, m.gpa, len(m.data)) == m.data, f"marker at {m.gpa:#x}"


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("guest", GUESTS)
def test_paused_vm_equals_qemu_dump(scratch, qemu, guest, accel):
    machine, memory, markers, extra = GUESTS[guest]
    with VM(machine=machine, memory=memory, markers=markers, accel=accel, extra=extra,
            qemu=qemu) as vm:
        vm.wait_running(1)
        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        r = livedump("--pid", str(vm.pid), str(ours))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "paused"
        vm.own_dump(theirs)
        assert first_difference(ours, theirs) is None
        # QEMU's class, byte order, machine and CPU notes (NT_PRSTATUS, QEMU) too.
        assert identity(ours) == identity(theirs)
        cpus = 2 if guest == "q35-5G" else 1
        assert identity(ours)[3].count(("CORE", "NT_PRSTATUS")) == cpus
        assert_markers(ours, markers)
        assert stat.S_IMODE(os.stat(ours).st_mode) == 0o600
        assert b"already paused" in r.stderr
        # Untouched and zero memory are holes: far less is allocated than QEMU's file.
        assert os.stat(ours).st_blocks * 512 < os.stat(theirs).st_blocks * 512 // 4


def test_no_pause_never_stops_the_guest(scratch, qemu):
    with VM(memory="1G", markers=MARKERS, qemu=qemu) as vm:
        vm.wait_running(1)
        vm.events()
        out = scratch / "fuzzy.vmcore"
        r = livedump("--pid", str(vm.pid), "--no-pause", "--json", str(out))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["paused"] is False
        assert "STOP" not in vm.events()
        assert vm.status() == "running"
        assert_markers(out, MARKERS[1:])  # Firmware does not touch these.


@pytest.mark.parametrize("accel", ACCELS)
def test_running_vm_is_dumped_and_keeps_running(scratch, qemu, accel):
    with VM(machine="q35", memory="5G", markers=HIGH_MARKERS, qemu=qemu, accel=accel) as vm:
        vm.wait_running(1)
        vm.events()
        out = scratch / "run.vmcore"
        r = livedump("--pid", str(vm.pid), "--json", str(out))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "running"
        assert_markers(out, HIGH_MARKERS)
        report = json.loads(r.stdout)
        assert report["was_running"] is True and report["paused"] is True
        # As long as QEMU's STOP and RESUME say, at most (by a millisecond: their
        # timestamps are QEMU's wall clock, livedump's report its own clock).
        assert 0 < pause_of(vm.event_log()) <= report["pause_seconds"] + 1e-3
        for m in HIGH_MARKERS:  # Nothing livedump prints holds guest memory.
            assert m.data[:16] not in r.stdout + r.stderr
        assert 0 < report["pause_seconds"] <= report["wall_seconds"]
        assert report["memory_bytes"] == sum(load.memsz for load in loads(out))
        high = report["blocks"][-1]
        assert (high["gpa"], high["size"]) == (0x1_0000_0000, 3 * GiB)
        with open(f"/proc/{vm.pid}/mem", "rb") as mem:  # The block's place in QEMU, too.
            for m in HIGH_MARKERS:
                mem.seek(high["hva"] + m.gpa - high["gpa"])
                assert mem.read(len(m.data)) == m.data


def test_vm_started_paused_stays_paused(scratch, qemu):
    with VM(memory="512M", markers=MARKERS[:2], start_paused=True, qemu=qemu) as vm:
        assert vm.status() == "prelaunch"
        out = scratch / "s.vmcore"
        r = livedump("--pid", str(vm.pid), str(out))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "prelaunch"
        assert_markers(out, MARKERS[:2])


def test_existing_output_is_left_alone_without_force(scratch):
    with VM(memory="128M") as vm:
        out = scratch / "exists.vmcore"
        out.write_bytes(b"precious")
        r = livedump("--pid", str(vm.pid), str(out))
        assert r.returncode == 7
        assert b"exists" in r.stderr and b"--force" in r.stderr
        assert out.read_bytes() == b"precious"
        assert vm.status() == "running"
        assert sorted(p.name for p in scratch.iterdir()) == ["exists.vmcore"]

        r = livedump("--pid", str(vm.pid), "--force", str(out))
        assert r.returncode == 0, r.stderr
        assert loads(out)
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_stdout_stream_equals_file(scratch):
    with VM(memory="512M", markers=MARKERS[:2], start_paused=True) as vm:
        a, b = scratch / "file.vmcore", scratch / "pipe.vmcore"
        assert livedump("--pid", str(vm.pid), str(a)).returncode == 0
        with open(b, "wb") as f:
            r = livedump("--pid", str(vm.pid), "-", stdout=f)
        assert r.returncode == 0, r.stderr
        assert a.read_bytes() == b.read_bytes()


def test_busy_socket_is_skipped_and_named(scratch, qemu):
    """A monitor that another client holds never greets: try the next one."""
    with VM(memory="128M", qemu=qemu) as vm:
        # The harness holds harness.sock; put it first so livedump meets it first.
        out = scratch / "x.vmcore"
        r = livedump("--qmp", str(vm.harness_socket), "--qmp-timeout", "1", str(out))
        assert r.returncode == 5
        assert str(vm.harness_socket).encode() in r.stderr
        assert b"no greeting within 1 s" in r.stderr
        assert not out.exists()
        assert vm.status() == "running"


def test_qmp_socket_alone_finds_the_pid(scratch, qemu):
    with VM(memory="128M", markers=MARKERS[:1], qemu=qemu) as vm:
        out = scratch / "q.vmcore"
        r = livedump("--qmp", str(vm.socket), "--json", str(out))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == vm.pid
        assert_markers(out, MARKERS[:1])


def test_socket_of_another_vm_is_refused(scratch):
    with VM(memory="128M") as a, VM(memory="128M") as b:
        r = livedump("--qmp", str(a.socket), "--pid", str(b.pid), str(scratch / "n"))
        assert r.returncode == 2
        assert f"belongs to QEMU PID {a.pid}, not to PID {b.pid}".encode() in r.stderr
        assert a.status() == b.status() == "running"
        assert not os.listdir(scratch)


def test_bad_targets_get_distinct_codes(scratch):
    out = str(scratch / "n.vmcore")
    r = livedump("--pid", "999999999", out)
    assert (r.returncode, r.stderr) == (3, b"livedump: no process with PID 999999999\n")
    r = livedump("--pid", str(os.getpid()), out)
    assert r.returncode == 4 and b"not a QEMU" in r.stderr
    r = livedump("--qmp", str(scratch / "nothing.sock"), out)
    assert r.returncode == 5 and b"nothing.sock" in r.stderr
    r = livedump(out)
    assert r.returncode == 2
    r = livedump("--pid", str(os.getpid()), "--arch", "mips", out)
    assert r.returncode == 2 and b"unknown architecture 'mips'" in r.stderr
    assert not os.listdir(scratch)
