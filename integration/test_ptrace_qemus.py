"""--via ptrace on each QEMU built with debug info (integration/qemus.py): 7.2 and 10.0.

Ptrace mode reads QEMU's memory map and vCPUs through the DWARF of the very
build that runs, and QEMU's structures change between releases; so each
build is held to its own ``dump-guest-memory``: a paused guest dumped
through ptrace has that QEMU's PT_LOADs and every byte, and under TCG its
ELF identity and CPU notes too, read from QEMU's memory. The guest of the
byte comparison counts in its memory all the time, and counts on after it;
a long-mode guest gives the x86_64 notes.
"""

import json
from pathlib import Path

import pytest

from livedump.ptrace import ram_map as dwarf_map
from livedump.ptrace.dwarf import qemu_layout
from livedump.ptrace.freeze import frozen
from livedump.qmp import ram_map as monitor_map
from livedump.qmp.monitor import Monitor
from livedump.qmp.transport import QMPTransport
from livedump.transfer.memory import ProcessMemory, read_maps
from livedump.vmcore.blocks import coalesce
from livedump.vmcore.notes import parse

from . import qemus
from .conftest import livedump
from .counting import assert_counts
from .test_dump import MARKERS, assert_markers
from .test_ptrace import thread_states
from .test_ptrace_cpu import assert_same_notes
from .vm import ARCH_PLATFORMS, COUNTING_PC, VM, kvm_usable
from .vmcore import first_difference, identity

DEBUG = qemus.debug_builds()
ACCELS = ["tcg"] + (["kvm"] if kvm_usable() else [])

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(
    not DEBUG, reason="no QEMU with debug info: run integration/build-qemu-debug.sh [10.0]")]


def first_mib(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 20)


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("series", DEBUG)
def test_paused_guest_equals_that_qemus_own_dump(scratch, series, accel):
    """The counting guest, its only monitor held: paused, dumped, and counting again."""
    with VM(qemu=str(DEBUG[series].binary), platform=COUNTING_PC, memory="512M",
            accel=accel, markers=MARKERS[:2], extra=["-smp", "2"],
            livedump_socket=False) as vm:
        assert_counts(vm)
        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "paused" and "t" not in thread_states(vm.pid)
        vm.own_dump(theirs)
        assert first_difference(ours, theirs) is None
        assert_markers(ours, MARKERS[:2])
        report = json.loads(r.stdout)
        if accel == "tcg":
            assert identity(ours) == identity(theirs)
            assert_same_notes(parse(first_mib(ours)), parse(first_mib(theirs)))
            assert report["cpu_notes"].startswith("CORE, QEMU notes from QEMU's memory (TCG")
        else:  # The registers are the kernel's, which nothing asked QEMU to fetch.
            assert report["cpu_notes"].startswith("no CPU registers: under KVM")
        vm.command("cont")
        assert_counts(vm)


@pytest.mark.parametrize("series", DEBUG)
def test_long_mode_registers_equal_that_qemus(scratch, series):
    """x86_64 notes, with the guest's CR3, EFER and descriptor tables, from 10.0's
    DWARF as from 7.2's."""
    with VM(qemu=str(DEBUG[series].binary), platform=ARCH_PLATFORMS["x86_64"], memory="256M",
            extra=["-smp", "2"], livedump_socket=False) as vm:
        vm.wait_running(1)
        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", str(ours))
        assert r.returncode == 0, r.stderr
        vm.own_dump(theirs, begin=0, length=4096)  # QEMU's notes are those of a full dump
        assert vm.status() == "paused" and "t" not in thread_states(vm.pid)
    ours_notes, theirs_notes = parse(first_mib(ours)), parse(first_mib(theirs))
    assert (theirs_notes.arch.name, theirs_notes.arch.bits) == ("x86_64", 64)
    assert_same_notes(ours_notes, theirs_notes)


@pytest.mark.parametrize("series", DEBUG)
@pytest.mark.parametrize("machine, ram", [("pc", "1G"), ("q35", "5G")])
def test_debug_info_map_equals_that_qemus_monitor_map(series, machine, ram):
    """PAM-split low RAM (pc), and RAM above 4 GiB (q35), with the names and
    host addresses QEMU gives."""
    with VM(qemu=str(DEBUG[series].binary), machine=machine, memory=ram) as vm:
        vm.wait_running(1)
        layout = qemu_layout(f"/proc/{vm.pid}/exe")
        bias = dwarf_map.load_bias(vm.pid, layout, read_maps(vm.pid))
        monitor = Monitor(QMPTransport(str(vm.socket), 5))
        try:
            vm.command("stop")
            with ProcessMemory(vm.pid) as memory, frozen(vm.pid):
                ours = dwarf_map.guest_ranges(memory, layout, bias)
            theirs = monitor_map.guest_ranges(monitor, monitor_map.flat_view(monitor))
        finally:
            monitor.close()
        assert [(r.gpa, r.size, r.hva, r.name) for r in ours] == \
               [(r.gpa, r.size, r.hva, r.name) for r in theirs]
        assert coalesce(ours) == coalesce(theirs)
        if ram == "5G":
            assert max(r.gpa + r.size for r in ours) > 1 << 32
