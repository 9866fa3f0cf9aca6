"""The Linux test guest itself: it boots under TCG, and the guest-physical
addresses it reports for its markers are right, as QEMU's own dump shows.

Slow (about half a minute under TCG); deselect with ``-m "not linux"``.
The first run also downloads Debian's kernel and busybox with apt-get.
"""

import json
import mmap
import struct
import time

import pytest

from .conftest import livedump
from .linux_guest import IDLE, LinuxVM
from .vmcore import first_difference, loads, notes, read_phys

pytestmark = [pytest.mark.qemu, pytest.mark.linux]

MARKERS = 4


def test_linux_guest_dump_has_markers_and_equals_qemu_dump(scratch, qemu):
    # 4 GiB on q35: RAM below and above 4 GiB, so markers may land in either.
    with LinuxVM(machine="q35", memory="4G", touch_mib=256, guest_markers=MARKERS, qemu=qemu) as vm:
        vm.wait_ready(timeout=300)
        vm.wait_idle(timeout=300)
        touch = vm.touch_report()
        assert touch is not None and touch.mib == 256
        markers = vm.guest_marker_list()
        assert len(markers) == MARKERS
        assert len({m.text for m in markers}) == MARKERS
        assert len({m.gpa for m in markers}) == MARKERS

        # The running guest: paused for the dump, running again after it.
        live = scratch / "live.vmcore"
        r = livedump(*vm.livedump_args(), "--json", str(live))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "running"
        for m in markers:
            assert m.gpa % 4096 == 0
            # The page holds the text repeated; the first copy is enough.
            assert read_phys(live, m.gpa, len(m.text)) == m.text.encode(), hex(m.gpa)
        check_vmcoreinfo(live, vm, json.loads(r.stdout)["vmcoreinfo"])
        live.unlink()

        # --live: the same markers, from QEMU's background snapshot.
        r = livedump(*vm.livedump_args(), "--live", "--json", str(live))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["live"]
        assert vm.status() == "running"
        for m in markers:
            assert read_phys(live, m.gpa, len(m.text)) == m.text.encode(), hex(m.gpa)
        # VMCOREINFO is found among the pages of the stream too.
        check_vmcoreinfo(live, vm, json.loads(r.stdout)["vmcoreinfo"])
        live.unlink()

        # The paused guest: livedump's vmcore equals QEMU's own, byte for byte.
        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        assert livedump(*vm.livedump_args(), str(ours)).returncode == 0
        vm.own_dump(theirs)
        assert first_difference(ours, theirs) is None


def test_qemus_vmcoreinfo_is_carried_not_found_again(scratch, qemu):
    # With the vmcoreinfo device (and qemu_fw_cfg loaded, as /init does), QEMU's
    # notes hold VMCOREINFO: livedump carries it, once, as QEMU's own dump does.
    with LinuxVM(machine="q35", memory="1G", extra=["-device", "vmcoreinfo"], qemu=qemu) as vm:
        vm.wait_idle(timeout=300)
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        r = livedump(*vm.livedump_args(), "--json", str(ours))
        assert r.returncode == 0, r.stderr
        vm.command("stop")
        vm.own_dump(theirs)
        facts = vm.kernel_facts()
    assert json.loads(r.stdout)["vmcoreinfo"]["source"] == "qemu"
    [carried] = [desc for name, _, desc in notes(ours) if name == "VMCOREINFO"]
    [qemus] = [desc for name, _, desc in notes(theirs) if name == "VMCOREINFO"]
    assert carried == qemus == kernel_vmcoreinfo(ours, facts)
    assert [name for name, _, _ in notes(ours) if name == "LIVEDUMP"] == ["LIVEDUMP"]


def test_after_a_reboot_the_running_kernels_vmcoreinfo_is_chosen(scratch, qemu):
    # A warm reset leaves RAM as it was: the first kernel's VMCOREINFO page and
    # image survive, and pass every check on their own. The vCPUs' page tables
    # say which kernel runs.
    with LinuxVM(machine="q35", memory="1G", extra=["-action", "reboot=reset"], qemu=qemu) as vm:
        vm.wait_idle(timeout=300)
        before = vm.kernel_facts()
        vm.command("system_reset")
        deadline = time.monotonic() + 300
        while vm.console_text().count(IDLE) < 2:
            assert time.monotonic() < deadline, vm.console_text()
            time.sleep(0.2)
        after = vm.kernel_facts()
        vmcore = scratch / "rebooted.vmcore"
        r = livedump(*vm.livedump_args(), "--json", str(vmcore))
        assert r.returncode == 0, r.stderr
    assert before.kaslr_offset != after.kaslr_offset
    report = json.loads(r.stdout)["vmcoreinfo"]
    assert report["source"] == "guest", report
    [ours] = [desc for name, _, desc in notes(vmcore) if name == "VMCOREINFO"]
    assert ours == kernel_vmcoreinfo(vmcore, after)
    assert f"KERNELOFFSET={after.kaslr_offset:x}\n".encode() in ours
    # The new kernel may have reused the earlier page; if it did not, the report
    # names it: as an earlier kernel's where that kernel's image survived too, as
    # set aside where the new kernel overwrote it.
    earlier = vmcoreinfo_pages(vmcore, before.kaslr_offset)
    for gpa in earlier:
        assert (f"GPA {gpa:#x} is an earlier kernel's" in report["detail"]
                or f"GPA {gpa:#x} set aside: init_uts_ns" in report["detail"]), report
    assert earlier or ("earlier" not in report["detail"]
                       and "set aside" not in report["detail"]), report


def vmcoreinfo_pages(vmcore, kaslr_offset):
    """Guest-physical addresses of the pages of ``vmcore`` that hold VMCOREINFO
    text of the kernel KASLR put at ``kaslr_offset``, found by brute force."""
    line = f"\nKERNELOFFSET={kaslr_offset:x}\n".encode()
    found = []
    with open(vmcore, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
        for load in loads(vmcore):
            end = load.offset + load.filesz
            at = data.find(line, load.offset, end)
            while at >= 0:
                page = at - (at - load.offset) % 4096
                if data[page : page + 10] == b"OSRELEASE=":
                    found.append(load.paddr + page - load.offset)
                at = data.find(line, at + 1, end)
    return found


def kernel_vmcoreinfo(vmcore, facts):
    """The text of the kernel's own VMCOREINFO note, at the physical address
    /sys/kernel/vmcoreinfo gave, as ``vmcore`` holds it."""
    head = read_phys(vmcore, facts.vmcoreinfo_paddr, 24)
    namesz, descsz, _ = struct.unpack("<3I", head[:12])
    assert (namesz, head[12:24]) == (11, b"VMCOREINFO\0\0")
    return read_phys(vmcore, facts.vmcoreinfo_paddr + 24, descsz)


def check_vmcoreinfo(vmcore, vm, report):
    """The VMCOREINFO livedump found (no vmcoreinfo device here) is the kernel's
    own: the text of the note at the physical address /sys/kernel/vmcoreinfo
    gives, read from the same dump, with the KASLR offset the guest reports."""
    facts = vm.kernel_facts()
    assert facts is not None, vm.console_text()
    [ours] = [desc for name, _, desc in notes(vmcore) if name == "VMCOREINFO"]
    assert ours == kernel_vmcoreinfo(vmcore, facts)
    entries = dict(line.split("=", 1) for line in ours.decode().splitlines())
    assert int(entries["KERNELOFFSET"], 16) == facts.kaslr_offset != 0
    assert report["source"] == "guest" and report["release"] == entries["OSRELEASE"]
