"""The proof that matters: crash and drgn open livedump's vmcores of a real
Linux guest with no extra flags, where drgn refuses QEMU's own dump.

Opt-in (``-m analysis``): it needs the guest kernel's vmlinux with debug
info, from Debian's ``linux-image-<release>-dbg`` (an 858 MB download on
first use, of which only vmlinux is kept in the guest cache), drgn (from
PyPI, in the ``test`` extra) and Debian's ``crash``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import livedump
from .linux_guest import PANIC, LinuxVM, debug_vmlinux, kernel_release
from .vmcore import read_phys

pytestmark = [pytest.mark.qemu, pytest.mark.linux, pytest.mark.analysis]

MARKER_PROCESS = "livedump-guest"  # the comm of toucher.c's process, which holds the markers

# drgn: the release, and every task's PID and comm.
DRGN_SCRIPT = """
from drgn.helpers.linux.pid import for_each_task
print("release", prog["init_uts_ns"].name.release.string_().decode())
for task in for_each_task(prog):
    print("task", task.pid.value_(), task.comm.string_().decode())
"""


@pytest.fixture(scope="module")
def vmlinux():
    return debug_vmlinux()


def drgn(vmlinux, vmcore) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drgn", "-q", "-c", str(vmcore), "-s",
                           str(vmlinux), "-e", DRGN_SCRIPT],
                          capture_output=True, text=True, timeout=300)


def crash(vmlinux, vmcore, *commands: str) -> dict[str, str]:
    """Run crash's ``commands`` on ``vmcore`` in one session (loading vmlinux takes
    a while); the output of each. No --kaslr: crash must work it out."""
    script = vmcore.parent / "crash.commands"
    script.write_text("".join(f"!echo @@@ {c}\n{c}\n" for c in commands) + "quit\n")
    r = subprocess.run(["crash", "-s", str(vmlinux), str(vmcore), "-i", str(script)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    parts = r.stdout.split("@@@ ")[1:]
    assert len(parts) == len(commands), r.stdout + r.stderr
    return {c: part.removeprefix(c + "\n") for c, part in zip(commands, parts, strict=True)}


def dump(vm: LinuxVM, path: Path, *args: str) -> dict:
    r = livedump(*vm.livedump_args(), "--json", *args, str(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_crash_and_drgn_open_a_running_guest_where_drgn_refuses_qemus_dump(scratch, qemu, vmlinux):
    release = kernel_release()
    with LinuxVM(machine="q35", memory="2G", smp=2, guest_markers=2, qemu=qemu) as vm:
        vm.wait_idle(timeout=300)
        markers = vm.guest_marker_list()
        ours, snapshot = scratch / "running.vmcore", scratch / "snapshot.vmcore"
        theirs = scratch / "qemu.vmcore"
        assert dump(vm, ours)["vmcoreinfo"]["source"] == "guest"
        report = dump(vm, snapshot, "--live")  # from QEMU's background snapshot
        assert report["live"] and report["vmcoreinfo"]["source"] == "guest"
        vm.command("stop")
        vm.own_dump(theirs)
        # Without QEMU's CPU notes (as in ptrace mode), crash finds the kernel
        # through VMCOREINFO alone.
        bare = scratch / "no-cpu-notes.vmcore"
        assert livedump(*vm.livedump_args(), "--no-pause", str(bare)).returncode == 0

    r = drgn(vmlinux, theirs)
    assert r.returncode != 0 and "unrecognized QEMU memory dump" in r.stderr

    for vmcore in (ours, snapshot):
        for m in markers:
            assert read_phys(vmcore, m.gpa, len(m.text)) == m.text.encode()

        r = drgn(vmlinux, vmcore)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert f"release {release}" in lines
        assert any(line.split()[2:] == [MARKER_PROCESS]
                   for line in lines if line.startswith("task"))

        # gdb reads the notes too.
        r = subprocess.run(["gdb", "-batch", "-c", str(vmcore), "-ex", "info registers rip"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "rip" in r.stdout, r.stdout + r.stderr

        out = crash(vmlinux, vmcore, "sys", "bt -a", "log")
        assert f"RELEASE: {release}" in out["sys"]
        assert out["bt -a"].count("PID: ") == 2 and "bt: " not in out["bt -a"], out["bt -a"]
        assert f"Linux version {release}" in out["log"]
    assert f"RELEASE: {release}" in crash(vmlinux, bare, "sys")["sys"]


def test_crash_shows_the_panic_of_a_panicked_guest(scratch, qemu, vmlinux):
    with LinuxVM(machine="q35", memory="1G", panic=True, qemu=qemu) as vm:
        vm.wait_for(f"^{PANIC}$", timeout=300)
        vm.wait_for("Kernel panic - not syncing", timeout=60, fail=None)
        vmcore = scratch / "panic.vmcore"
        dump(vm, vmcore)
    out = crash(vmlinux, vmcore, "sys", "log", "bt")
    assert 'PANIC: "Kernel panic - not syncing: sysrq triggered crash' in out["sys"]
    assert "sysrq: Trigger a crash" in out["log"]
    assert "Kernel panic - not syncing: sysrq triggered crash" in out["log"]
    assert "sysrq_handle_crash" in out["bt"], out["bt"]
