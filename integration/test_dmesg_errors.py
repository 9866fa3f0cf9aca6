"""``livedump dmesg`` and ``watch`` where there is no Linux kernel to read: a
firmware-only guest (no boot, so quick)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import livedump
from .vm import HALTING_PC, VM

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[1]


def test_dmesg_of_a_guest_with_no_linux_says_so():
    with VM(platform=HALTING_PC, memory="256M") as vm:
        vm.wait_running()
        r = livedump("dmesg", "--pid", str(vm.pid))
        assert vm.status() == "running"
    assert r.returncode == 17
    assert r.stderr.decode().startswith(
        "livedump: no VMCOREINFO in guest memory: not a booted Linux guest?")
    assert r.stdout == b""


def test_watch_of_a_guest_with_no_linux_waits_on_qemus_events(scratch):
    with VM(platform=HALTING_PC, memory="256M") as vm:
        vm.wait_running()
        watch = subprocess.Popen([sys.executable, "-m", "livedump", "watch", "--once",
                                  "--pid", str(vm.pid), str(scratch)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            said = [watch.stderr.readline(), watch.stderr.readline()]
            assert b"not reading the guest kernel's log (no VMCOREINFO" in said[0], said
            assert b"no kernel log, QMP events" in said[1], said
            time.sleep(2)
            assert watch.poll() is None and list(scratch.iterdir()) == []
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=30)
        finally:
            watch.kill()
        assert watch.returncode == 130, err
        assert vm.status() == "running"
