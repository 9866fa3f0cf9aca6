"""--via ptrace: the vCPUs' registers read from QEMU's memory through its DWARF.

For a paused TCG guest, livedump's CPU notes must be QEMU's own, byte for
byte: QEMU's dump-guest-memory of one page (through the harness's monitor)
carries exactly the notes of its full dump. Under KVM the registers are
the kernel's, and livedump must say it has none.
"""

import json
import subprocess
from pathlib import Path

import pytest

from livedump.vmcore.notes import QemuNotes, parse

from . import linux_guest
from .conftest import livedump
from .linux_guest import LinuxVM
from .test_ptrace import thread_states
from .vm import VM, kvm_usable
from .vmcore import identity

pytestmark = pytest.mark.qemu


def qemu_notes(vm: VM, path: Path) -> QemuNotes:
    """The notes of QEMU's own dump of the paused guest (one page of it)."""
    vm.command("dump-guest-memory", paging=False, protocol=f"file:{path}",
               begin=0, length=4096)
    assert vm.command("query-dump")["status"] == "completed"
    return parse(path.read_bytes())


def ptrace_dump(vm: VM, scratch: Path) -> tuple[QemuNotes, dict]:
    """livedump --via ptrace of the paused guest: its notes and its report."""
    ours = scratch / "ours.vmcore"
    target = vm.livedump_args() if isinstance(vm, LinuxVM) else ("--pid", str(vm.pid))
    r = livedump(*target, "--via", "ptrace", "--json", str(ours))
    assert r.returncode == 0, r.stderr
    assert vm.status() == "paused" and "t" not in thread_states(vm.pid)
    with open(ours, "rb") as f:
        notes = parse(f.read(1 << 20))
    ours.unlink()
    return notes, json.loads(r.stdout)


def assert_same_notes(ours: QemuNotes, theirs: QemuNotes) -> None:
    assert ours.arch == theirs.arch
    # QEMU's notes first, then only livedump's own (and VMCOREINFO, where found).
    assert ours.names[:len(theirs.names)] == theirs.names
    assert set(ours.names[len(theirs.names):]) <= {"LIVEDUMP", "VMCOREINFO"}
    assert ours.data[:len(theirs.data)] == theirs.data


def test_firmware_guest_registers_equal_qemus(scratch, debug_qemu):
    """SeaBIOS with nothing to boot idles in real mode: i386 notes, ELF64 as the
    BIOS ROM ends at 4 GiB."""
    with VM(qemu=debug_qemu, memory="1G", extra=["-smp", "2"]) as vm:
        vm.wait_running(1)
        vm.command("stop")
        ours, report = ptrace_dump(vm, scratch)
        theirs = qemu_notes(vm, scratch / "qemu.vmcore")
    assert (theirs.arch.name, theirs.arch.bits) == ("386", 64)
    assert theirs.names == ("CORE", "CORE", "QEMU", "QEMU")
    assert_same_notes(ours, theirs)
    assert report["arch"] == "386" and report["elf_class"] == 64
    assert report["cpu_notes"].startswith("CORE, QEMU notes from QEMU's memory (TCG")


@pytest.mark.linux
def test_long_mode_guest_registers_equal_qemus(scratch, debug_qemu):
    """A 64-bit Linux kernel on two vCPUs: x86_64 notes with its CR3, IDT, GDT."""
    with LinuxVM(qemu=debug_qemu, memory="1G", smp=2) as vm:
        vm.wait_ready(timeout=300)
        vm.command("stop")
        ours, report = ptrace_dump(vm, scratch)
        theirs = qemu_notes(vm, scratch / "qemu.vmcore")
    assert (theirs.arch.name, theirs.arch.bits) == ("x86_64", 64)
    assert_same_notes(ours, theirs)
    assert report["arch"] == "x86_64"


@pytest.mark.linux
@pytest.mark.analysis
def test_crash_finds_the_kernel_of_a_running_guest_through_the_notes(scratch, debug_qemu):
    """No VMCOREINFO: crash finds the KASLR offset from the QEMU notes' CR3 and
    IDT, and unwinds both vCPUs from their NT_PRSTATUS registers. (In the
    opt-in analysis tier: it needs the guest kernel's vmlinux.)"""
    vmlinux = linux_guest.debug_vmlinux()
    with LinuxVM(qemu=debug_qemu, memory="1G", smp=2) as vm:
        vm.wait_ready(timeout=300)
        vmcore = scratch / "live.vmcore"
        r = livedump(*vm.livedump_args(), "--via", "ptrace", str(vmcore))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "running"
    r = subprocess.run(["crash", "-s", str(vmlinux), str(vmcore)], input="sys\nbt -a\nquit\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"RELEASE: {linux_guest.kernel_release()}" in r.stdout, r.stdout
    for cpu in (0, 1):  # each vCPU's task, unwound from its registers
        assert f"CPU: {cpu}    COMMAND: " in r.stdout, r.stdout
    assert r.stdout.count(" #0 [ffff") == 2, r.stdout


@pytest.mark.skipif(not kvm_usable(), reason="no usable /dev/kvm")
def test_kvm_guest_has_registers_only_once_qemu_fetched_them(scratch, debug_qemu):
    with VM(qemu=debug_qemu, memory="1G", accel="kvm", extra=["-smp", "2"]) as vm:
        vm.wait_running(1)
        vm.command("stop")
        ours = scratch / "ours.vmcore"
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["cpu_notes"].startswith("no CPU registers: under KVM")
        assert report["arch"] == "x86_64"  # from the binary's name: the guest's mode is unknown
        assert identity(ours)[3] == []  # no CORE or QEMU notes
        assert vm.status() == "paused"
        ours.unlink()

        # "info registers -a" has QEMU fetch every vCPU's registers from KVM.
        vm.command("human-monitor-command", **{"command-line": "info registers -a"})
        ours, report = ptrace_dump(vm, scratch)
        theirs = qemu_notes(vm, scratch / "qemu.vmcore")
    assert_same_notes(ours, theirs)
    assert report["cpu_notes"].startswith("CORE, QEMU notes from QEMU's memory (KVM's")
