"""The Linux test guest itself: it boots under TCG, and the guest-physical
addresses it reports for its markers are right, as QEMU's own dump shows.

Slow (about half a minute under TCG); deselect with ``-m "not linux"``.
The first run also downloads Debian's kernel and busybox with apt-get.
"""

import pytest

from .conftest import livedump
from .linux_guest import LinuxVM
from .vmcore import first_difference, read_phys

pytestmark = [pytest.mark.qemu, pytest.mark.linux]

MARKERS = 4


def test_linux_guest_dump_has_markers_and_equals_qemu_dump(scratch):
    # 4 GiB on q35: RAM below and above 4 GiB, so markers may land in either.
    with LinuxVM(machine="q35", memory="4G", touch_mib=256, guest_markers=MARKERS) as vm:
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
        r = livedump("--pid", str(vm.pid), str(live))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "running"
        for m in markers:
            assert m.gpa % 4096 == 0
            # The page holds the text repeated; the first copy is enough.
            assert read_phys(live, m.gpa, len(m.text)) == m.text.encode(), hex(m.gpa)
        live.unlink()

        # --live: the same markers, from QEMU's background snapshot.
        r = livedump("--pid", str(vm.pid), "--live", str(live))
        assert r.returncode == 0, r.stderr
        assert b"(live: " in r.stderr
        assert vm.status() == "running"
        for m in markers:
            assert read_phys(live, m.gpa, len(m.text)) == m.text.encode(), hex(m.gpa)
        live.unlink()

        # The paused guest: livedump's vmcore equals QEMU's own, byte for byte.
        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        assert livedump("--pid", str(vm.pid), str(ours)).returncode == 0
        vm.own_dump(theirs)
        assert first_difference(ours, theirs) is None
