"""Which machine a vmcore says it is, where livedump has less than QEMU's CPU
state to go by: --no-pause, and an --arch that QEMU's target contradicts."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from . import qemus
from .conftest import livedump
from .linux_guest import SLOW_GUEST_TIMEOUTS, LinuxVM
from .test_arches import dump
from .test_dump import MARKERS, assert_markers
from .vm import VM
from .vmcore import first_difference, identity, loads, note_segments

QEMUS = qemus.available()


def wrapper(qemu: qemus.Qemu, scratch: Path) -> str:
    """An executable that starts ``qemu`` as its PID, for VM(qemu=...)."""
    path = scratch / f"qemu-{qemu.series}"
    path.write_text(f"#!/bin/sh\nexec {shlex.join(qemu.command())} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("series", QEMUS)
def test_no_pause_on_a_paused_vm_takes_qemus_notes_and_leaves_it_paused(scratch, series):
    """--no-pause only asks not to pause: a guest paused already gives QEMU's notes
    (SeaBIOS idles out of long mode: EM_386, which the target's default is not)."""
    with VM(memory="1G", markers=MARKERS, qemu=wrapper(QEMUS[series], scratch)) as vm:
        vm.wait_running(1)
        vm.command("stop")
        vm.events()
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        report = dump(vm, ours, "--no-pause")
        # Never resumed, even briefly (the one-page dump completes, as ever).
        assert vm.status() == "paused" and set(vm.events()) <= {"DUMP_COMPLETED"}
        vm.own_dump(theirs)
        assert identity(theirs)[:3] == (64, True, "EM_386")
        assert identity(ours) == identity(theirs)
        assert ("CORE", "NT_PRSTATUS") in identity(ours)[3]
        assert first_difference(ours, theirs) is None
        assert_markers(ours, MARKERS)
        assert (report["arch"], report["arch_from"]) == ("386", "QEMU's, from the CPU state")
        assert report["cpu_notes"] == "CORE, QEMU notes from QEMU's dump-guest-memory"
        assert (report["was_running"], report["paused"]) == (False, False)


def test_arch_that_qemus_target_contradicts_is_written_with_a_warning(scratch):
    """--arch is the user's word over livedump's sources; one that the target
    cannot be is obeyed, and said to be a contradiction wherever it reports."""
    warning = ("--arch ppc64-le contradicts QEMU target x86_64, whose vmcores are x86_64 "
               "or 386: the vmcore says a machine the guest is not")
    with VM(memory="256M", markers=MARKERS[:1]) as vm:
        vm.wait_running(1)
        ours = scratch / "ours.vmcore"
        r = livedump("--pid", str(vm.pid), "--json", "--arch", "ppc64-le", str(ours))
        assert r.returncode == 0, r.stderr
        assert r.stderr.decode() == f"livedump: warning: {warning}\n"
        report = json.loads(r.stdout)
        assert (report["arch"], report["arch_from"], report["qemu_target"]) == (
            "ppc64-le", "--arch", "x86_64")
        assert report["warnings"] == [warning]
        assert identity(ours) == (64, True, "EM_PPC64", [])  # As asked: no x86 notes.
        assert_markers(ours, MARKERS[:1])

        # The human report says it too, --quiet or not.
        for quiet in ((), ("-q",)):
            r = livedump("--pid", str(vm.pid), *quiet, "--force", "--arch", "ppc64le", str(ours))
            assert r.returncode == 0, r.stderr
            lines = r.stderr.decode().splitlines()
            assert lines[0] == f"livedump: warning: {warning}"
            assert [line.startswith("livedump: wrote ") for line in lines[1:]] == (
                [] if quiet else [True])

        # An --arch QEMU's dump of the target can have is no contradiction.
        r = livedump("--pid", str(vm.pid), "--json", "--force", "--arch", "i386", str(ours))
        assert r.returncode == 0 and r.stderr == b""
        assert json.loads(r.stdout)["warnings"] == []
        assert vm.status() == "running"


def readelf_notes(vmcore: Path) -> list[str]:
    """The owner of each note ``readelf -n`` lists, which must find nothing amiss."""
    r = subprocess.run(["readelf", "-n", "-W", str(vmcore)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    listed = r.stdout.split("Description\n", 1)[1].splitlines()
    return [line.split()[0] for line in listed if line.startswith("  ") and
            not line.startswith("   ")]


@pytest.mark.linux
def test_readers_see_the_notes_and_no_placeholder(scratch):
    """The room kept for VMCOREINFO (found once memory is written) is outside
    PT_NOTE: readelf lists the notes and nothing else, with the note found in a
    file and without it on standard output; gdb reads both."""
    with LinuxVM(machine="q35", memory="1G") as vm:
        vm.wait_idle(timeout=300)
        found, piped = scratch / "found.vmcore", scratch / "piped.vmcore"
        assert dump(vm, found, *SLOW_GUEST_TIMEOUTS)["vmcoreinfo"]["source"] == "guest"
        with open(piped, "wb") as f:
            r = livedump(*vm.livedump_args(), "-q", "-", stdout=f)
        assert r.returncode == 0, r.stderr
    assert readelf_notes(found) == ["CORE", "QEMU", "LIVEDUMP", "VMCOREINFO"]
    assert readelf_notes(piped) == ["CORE", "QEMU", "LIVEDUMP"]
    for vmcore in (found, piped):
        [load, *_] = loads(vmcore)
        [note] = [(offset, size) for offset, size in note_segments(vmcore)]
        with open(vmcore, "rb") as f:  # The room: zeros between the notes and memory.
            f.seek(sum(note))
            assert f.read(load.offset - sum(note)) == bytes(load.offset - sum(note))
        r = subprocess.run(["gdb", "-batch", "-c", str(vmcore), "-ex", "info registers rip"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "rip" in r.stdout, r.stdout + r.stderr
