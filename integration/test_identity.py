"""Which machine a vmcore says it is, where livedump has less than QEMU's CPU
state to go by: --no-pause, and an --arch that QEMU's target contradicts."""

from .test_arches import dump
from .test_dump import MARKERS, assert_markers
from .vm import VM
from .vmcore import first_difference, identity


def test_no_pause_on_a_paused_vm_takes_qemus_notes_and_leaves_it_paused(scratch):
    """--no-pause only asks not to pause: a guest paused already gives QEMU's notes
    (SeaBIOS idles out of long mode: EM_386, which the target's default is not)."""
    with VM(memory="1G", markers=MARKERS) as vm:
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
