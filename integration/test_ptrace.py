"""--via ptrace: a VM whose monitor is out of reach, frozen with ptrace and mapped
through QEMU's debug info (a QEMU built from Debian's source with DWARF by
integration/build-qemu-debug.sh, which integration/setup --test runs)."""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import livedump
from .test_dump import HIGH_MARKERS, MARKERS, assert_markers
from .vm import VM, kvm_usable
from .vmcore import first_difference

DEBUG_QEMU = Path(os.environ.get("LIVEDUMP_QEMU_CACHE", Path.home() / ".cache/livedump/qemu-debug")
                  ) / "bin/qemu-system-x86_64"

pytestmark = pytest.mark.skipif(
    not DEBUG_QEMU.exists(), reason="no debug-info QEMU: run integration/build-qemu-debug.sh")

ACCELS = ["tcg"] + (["kvm"] if kvm_usable() else [])


def thread_states(pid: int) -> set[str]:
    states = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.add(f.read().rpartition(")")[2].split()[0])
    return states


@pytest.mark.parametrize("accel", ACCELS)
def test_vm_with_its_only_monitor_held_is_dumped_through_ptrace(scratch, debug_qemu, accel):
    """As with libvirt: the one QMP socket is taken, so auto mode falls back to ptrace."""
    with VM(qemu=debug_qemu, machine="q35", memory="5G", accel=accel,
            markers=MARKERS[:2] + HIGH_MARKERS, livedump_socket=False) as vm:
        vm.wait_running(1)
        ours = scratch / "ours.vmcore"
        r = livedump("--pid", str(vm.pid), "--qmp-timeout", "1", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        assert b'"via": "ptrace"' in r.stdout and b"no greeting within 1 s" in r.stdout
        assert vm.status() == "running"
        assert "t" not in thread_states(vm.pid)
        assert_markers(ours, MARKERS[:2] + HIGH_MARKERS)

        # Paused, for a comparison byte for byte with QEMU's own dump.
        vm.command("stop")
        ours.unlink()
        theirs = scratch / "qemu.vmcore"
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", str(ours))
        assert r.returncode == 0, r.stderr
        vm.own_dump(theirs)
        assert first_difference(ours, theirs) is None
        assert vm.status() == "paused"
        assert "t" not in thread_states(vm.pid)


def test_mismatched_debug_file_is_refused(scratch, tmp_path):
    # Debug info of another build: real DWARF, another build-id.
    source = tmp_path / "other.c"
    source.write_text("int address_space_memory;\nint main(void) { return 0; }\n")
    other = tmp_path / "other"
    subprocess.run(["gcc", "-g", "-Wl,--build-id", "-o", str(other), str(source)], check=True)
    with VM(qemu=str(DEBUG_QEMU), memory="128M") as vm:
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", "--debug-file", str(other),
                     str(scratch / "x.vmcore"))
        assert r.returncode == 11
        assert b"build-id" in r.stderr and r.stderr.count(b"\n") == 1
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", "--debug-file",
                     "/usr/bin/qemu-system-x86_64", str(scratch / "x.vmcore"))
        assert (r.returncode, r.stderr) == (
            11, b"livedump: /usr/bin/qemu-system-x86_64 has no DWARF debug info\n")
        assert vm.status() == "running" and "t" not in thread_states(vm.pid)
        assert os.listdir(scratch) == []


def test_no_debug_info_and_no_monitor_says_how_to_get_it(scratch, qemu):
    """Debian's own QEMUs have no DWARF; with its only monitor held there is no way in."""
    with VM(memory="128M", livedump_socket=False, qemu=qemu) as vm:
        r = livedump("--pid", str(vm.pid), "--qmp-timeout", "1", str(scratch / "x.vmcore"))
        assert r.returncode == 11
        err = r.stderr.decode()
        assert err.count("\n") == 1
        assert "no usable QMP monitor" in err and "no greeting within 1 s" in err
        assert "--debug-file" in err and "DEBUGINFOD_URLS" in err
        assert vm.status() == "running"
        assert os.listdir(scratch) == []


@contextlib.contextmanager
def frozen_dump(vm: VM) -> Iterator[subprocess.Popen]:
    """livedump --via ptrace writing into a pipe nobody reads: it stalls with QEMU frozen."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "livedump", "--pid", str(vm.pid),
                             "--via", "ptrace", "-"], stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    try:
        # A slow host takes its time to start livedump and attach to QEMU.
        deadline = time.monotonic() + 60
        while "t" not in thread_states(vm.pid):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "livedump never froze QEMU"
            time.sleep(0.01)
        yield proc
    finally:
        os.close(r)
        proc.kill()
        proc.wait()


def test_signal_while_frozen_thaws_qemu(scratch, debug_qemu):
    with VM(qemu=debug_qemu, memory="1G") as vm:
        with frozen_dump(vm) as proc:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 143, err
        assert "t" not in thread_states(vm.pid)
        assert vm.status() == "running"


def test_sigkill_while_frozen_lets_qemu_run(scratch, debug_qemu):
    """The kernel detaches a dead tracer's tracees: nothing stays stopped."""
    with VM(qemu=debug_qemu, memory="1G") as vm:
        with frozen_dump(vm) as proc:
            proc.kill()
            proc.wait()
        time.sleep(0.2)
        assert "t" not in thread_states(vm.pid)
        assert vm.status() == "running"


def test_corrupt_debug_file_is_refused(scratch, tmp_path):
    broken = tmp_path / "qemu.debug"
    with open(DEBUG_QEMU, "rb") as f:
        broken.write_bytes(f.read(1 << 20))  # The first MiB of the real one: cut short.
    with VM(qemu=str(DEBUG_QEMU), memory="128M") as vm:
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", "--debug-file", str(broken),
                     str(scratch / "x.vmcore"))
        assert r.returncode == 11, r.stderr
        assert r.stderr.startswith(b"livedump: ") and r.stderr.count(b"\n") == 1
        assert vm.status() == "running" and "t" not in thread_states(vm.pid)
        assert os.listdir(scratch) == []
