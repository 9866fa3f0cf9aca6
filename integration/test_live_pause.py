"""``--live`` pauses an x86 guest no longer than QEMU's background snapshot does.

On every QEMU here (7.2, 10.0): livedump sends no ``stop`` and, where QEMU
resumes the guest itself, no ``cont``; the CPU notes come from the vCPU
state the snapshot's stream carries, and equal the default mode's (QEMU's
own) for the same guest; a guest writing its memory all the time is dumped
consistently and runs on whole; a paused guest stays paused.
"""

import json
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from . import qemus
from .conftest import livedump
from .counting import wait_counting
from .firmware import X86_64_LONG_MODE, X86_HALT
from .health import assert_whole
from .test_live import counters, set_user_capabilities, settings
from .vm import COUNTING_PC, PC, SWEEPING_PC, VM, kvm_usable
from .vmcore import identity, notes

pytestmark = pytest.mark.qemu
QEMUS = qemus.available()
ACCELS = ["tcg"] + (["kvm"] if kvm_usable() else [])
# Guests whose registers never change once they halt (interrupts off): in
# real mode at the reset vector (QEMU writes an i386 vmcore), and in long
# mode (x86_64).
HALTED = {"real-mode": replace(PC, firmware=("-bios", X86_HALT)),
          "long-mode": replace(PC, firmware=("-bios", X86_64_LONG_MODE))}


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Each QEMU as one executable (an unpacked one needs its namespace): a wrapper
    that execs it, so the PID the test starts is QEMU's."""
    base = tmp_path_factory.mktemp("qemus")
    found = {}
    for series, qemu in QEMUS.items():
        path = base / f"qemu-{series}"
        path.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in qemu.command())
                        + ' "$@"\n')
        path.chmod(0o755)
        found[series] = str(path)
    yield found


def cpu_notes(path: Path) -> list[tuple[str, int, bytes]]:
    """The vCPUs' notes (CORE and QEMU), as QEMU's dump writes them."""
    return [n for n in notes(path) if n[0] in ("CORE", "QEMU")]


# QEMU traces every QMP command it is sent into the VM's log: what livedump
# sent, however it sent it (a relay would have to carry the pipe's descriptor).
TRACE = ["-trace", "handle_qmp_command"]


def sent(vm: VM) -> list[str]:
    """The QMP commands QEMU was sent so far, on any of its monitors, in order."""
    vm.log.flush()
    text = (vm.dir / "qemu.log").read_text(errors="replace")
    return re.findall(r'handle_qmp_command .*?"execute": "([\w-]+)"', text)


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("mode", HALTED)
@pytest.mark.parametrize("series", QEMUS)
def test_notes_from_the_stream_equal_the_default_modes(scratch, binaries, series, mode, accel):
    with VM(qemu=binaries[series], platform=HALTED[mode], memory="256M", accel=accel,
            extra=["-smp", "2", *TRACE]) as vm:
        vm.wait_running(0.5)
        default, live = scratch / "default.vmcore", scratch / "live.vmcore"
        r = livedump("--pid", str(vm.pid), str(default))
        assert r.returncode == 0, r.stderr
        done = len(sent(vm))
        r = livedump("--pid", str(vm.pid), "--live", "--json", str(live))
        assert r.returncode == 0, r.stderr
        commands = sent(vm)[done:]
        report = json.loads(r.stdout)
        assert report["live"] is True
        assert "background snapshot" in report["cpu_notes"], report["cpu_notes"]
        assert "stop" not in commands and "dump-guest-memory" not in commands, commands
        assert len(cpu_notes(live)) == 4  # two vCPUs: CORE, CORE, QEMU, QEMU
        assert cpu_notes(live) == cpu_notes(default)
        assert identity(live) == identity(default)  # ELF class, machine, notes' kinds
        assert vm.status() == "running"


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("series", QEMUS)
def test_qemus_pause_is_the_only_one(scratch, binaries, series, accel):
    """A guest that writes its memory all the time: no stop, no cont from livedump
    (QEMU resumes the guest itself), QEMU's STOP then RESUME, a short pause, a
    guest left whole and the settings put back."""
    with VM(qemu=binaries[series], platform=SWEEPING_PC, memory="1536M", accel=accel,
            extra=TRACE) as vm:
        vm.wait_running(0.5)
        before = set_user_capabilities(vm)
        vm.events()
        out = scratch / "live.vmcore"
        r = livedump("--pid", str(vm.pid), "--live", "--json", str(out), timeout=300)
        assert r.returncode == 0, r.stderr
        commands = sent(vm)
        assert "migrate" in commands
        assert "stop" not in commands and "cont" not in commands, commands
        events = vm.events()
        assert events.index("STOP") < events.index("RESUME"), events
        report = json.loads(r.stdout)
        assert report["paused"] is True and report["live"] is True
        # QEMU's own pause to start the snapshot: short, but a starved host
        # stretches it (a pause for the whole copy would be far longer).
        assert 0 < report["pause_seconds"] < 5, report["pause_seconds"]
        assert settings(vm) == before
        assert_whole(vm)
        os.unlink(out)


@pytest.mark.parametrize("series", QEMUS)
def test_one_instant_without_our_pause(scratch, binaries, series):
    """The counting guest's two copies of its count, in one vmcore: equal."""
    with VM(qemu=binaries[series], platform=COUNTING_PC, memory="256M") as vm:
        vm.wait_running(0.5)
        wait_counting(vm)
        out = scratch / "live.vmcore"
        for _ in range(3):
            r = livedump("--pid", str(vm.pid), "--live", "--force", str(out))
            assert r.returncode == 0, r.stderr
            first, second = counters(out)
            assert first == second and first > 0, (first, second)
        assert vm.status() == "running"


@pytest.mark.parametrize("series", QEMUS)
def test_paused_vm_stays_paused(scratch, binaries, series):
    with VM(qemu=binaries[series], platform=HALTED["long-mode"], memory="256M",
            extra=TRACE) as vm:
        vm.wait_running(0.5)
        vm.command("stop")
        vm.events()
        out = scratch / "live.vmcore"
        done = len(sent(vm))
        r = livedump("--pid", str(vm.pid), "--live", "--json", str(out))
        assert r.returncode == 0, r.stderr
        commands = sent(vm)[done:]
        assert "cont" not in commands and "migrate" not in commands, commands
        assert vm.status() == "paused"
        assert "RESUME" not in vm.events()
        report = json.loads(r.stdout)
        assert report["live"] is False and report["paused"] is False
        assert "QEMU" in {name for name, _, _ in cpu_notes(out)}


def test_arch_given_keeps_our_pause_and_qemus_notes(scratch, binaries):
    """With --arch the notes come from QEMU's one-page dump inside livedump's own
    pause, the snapshot started in it: a whole vmcore, the guest resumed by livedump."""
    series = next(iter(QEMUS))
    with VM(qemu=binaries[series], platform=HALTED["long-mode"], memory="256M",
            extra=TRACE) as vm:
        vm.wait_running(0.5)
        default, live = scratch / "default.vmcore", scratch / "live.vmcore"
        assert livedump("--pid", str(vm.pid), str(default)).returncode == 0
        done = len(sent(vm))
        r = livedump("--pid", str(vm.pid), "--live", "--arch", "x86_64", "--json", str(live))
        assert r.returncode == 0, r.stderr
        commands = sent(vm)[done:]
        assert commands.index("stop") < commands.index("dump-guest-memory") \
            < commands.index("migrate") < commands.index("cont"), commands
        assert json.loads(r.stdout)["live"] is True
        assert cpu_notes(live) == cpu_notes(default)
        assert vm.status() == "running"
