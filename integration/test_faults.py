"""Faults around a dump: the VM comes back as it was, and no broken file poses as a dump.

Each case checks afterwards: the VM's run state equals its state before,
livedump's exit code is non-zero and its one-line message names the cause,
and nothing is left at the output path (or beside it).
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from .conftest import livedump
from .qmp_proxy import QMPProxy
from .vm import VM, Marker


def wait_for_status(vm: VM, status: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while vm.status() != status:
        assert time.monotonic() < deadline, f"VM never became {status}"
        time.sleep(0.01)


def blocked_dump(vm: VM, *args: str) -> tuple[subprocess.Popen, int]:
    """livedump writing to a pipe nobody reads yet: it stalls mid-dump, VM paused."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "livedump", "--pid", str(vm.pid), *args, "-"],
                            stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    wait_for_status(vm, "paused")
    return proc, r


def drain(fd: int) -> None:
    """Read the pipe to its end in the background, so the stalled dump goes on."""
    def run() -> None:
        while os.read(fd, 1 << 20):
            pass
        os.close(fd)

    threading.Thread(target=run, daemon=True).start()


def test_full_filesystem(small_disk):
    """ENOSPC: reported, the temporary file removed, the VM running."""
    # Random bytes: neither holes nor zeros can save the space.
    with VM(memory="256M", markers=[Marker(0x100_0000, os.urandom(64 << 20))]) as vm:
        r = livedump("--pid", str(vm.pid), str(small_disk / "x.vmcore"))
        assert r.returncode == 8
        assert r.stderr.startswith(b"livedump: writing ") and b"No space left" in r.stderr
        assert os.listdir(small_disk) == []
        assert vm.status() == "running"


def test_qemu_killed_mid_dump(scratch, qemu):
    with VM(memory="1G", qemu=qemu) as vm:
        out = scratch / "x.vmcore"
        proc, fd = blocked_dump(vm)
        vm.process.kill()
        vm.process.wait()
        drain(fd)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3
        assert err == f"livedump: QEMU (PID {vm.pid}) exited during the dump\n".encode()
        assert not out.exists()


def test_monitor_connection_dropped_mid_dump(scratch, qemu):
    """The session breaks while memory is read: livedump reconnects to resume."""
    with VM(memory="1G", qemu=qemu) as vm, QMPProxy(vm.socket) as proxy:
        proc, fd = blocked_dump(vm, "--qmp", str(proxy.path))
        proxy.drop()
        drain(fd)
        _, err = proc.communicate(timeout=60)
        assert vm.status() == "running"
        assert proxy.connections == 2
        assert proc.returncode == 0, err


def test_slow_greeting(scratch):
    with VM(memory="128M") as vm, QMPProxy(vm.socket, greeting_delay=5) as proxy:
        out = scratch / "x.vmcore"
        r = livedump("--pid", str(vm.pid), "--qmp", str(proxy.path), "--qmp-timeout", "1",
                     "--via", "qmp", str(out))
        assert r.returncode == 5
        assert r.stderr == f"livedump: no QMP monitor answered: unix:{proxy.path}: " \
                           f"no greeting within 1 s\n".encode()
        assert os.listdir(scratch) == []
        assert vm.status() == "running"


def test_slow_reply_to_stop(scratch, qemu):
    """QEMU stops the guest but its reply is late: livedump gives up and resumes it."""
    # The monitor answers all before 'stop' within the limit, even on a slow host;
    # the reply to 'stop' comes well after it.
    with VM(memory="128M", qemu=qemu) as vm, QMPProxy(vm.socket, "stop", delay=20) as proxy:
        r = livedump("--pid", str(vm.pid), "--qmp", str(proxy.path), "--qmp-timeout", "5",
                     str(scratch / "x.vmcore"))
        assert r.returncode == 5, r.stderr
        assert b"no reply to 'stop' within 5 s" in r.stderr
        time.sleep(0.5)
        assert vm.status() == "running"
        assert os.listdir(scratch) == []


def test_second_livedump_on_the_same_vm_is_refused(scratch):
    with VM(memory="1G") as vm:
        proc, fd = blocked_dump(vm)
        try:
            # Refused at once, before it waits on a monitor or touches the VM.
            r = livedump("--pid", str(vm.pid), str(scratch / "second.vmcore"))
            assert r.returncode == 12
            assert r.stderr == (f"livedump: another livedump (PID {proc.pid}) is dumping "
                                f"QEMU PID {vm.pid}\n").encode()
            # Named by its other socket alone, it finds the PID first, then the lock.
            vm.qmp.close()
            r = livedump("--qmp", str(vm.harness_socket), str(scratch / "second.vmcore"))
            assert r.returncode == 12
        finally:
            drain(fd)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err  # The first run is unharmed.
        assert os.listdir(scratch) == []
        vm.qmp.connect()
        assert vm.status() == "running"


def test_unprivileged_user_is_refused(scratch):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    with VM(memory="128M") as vm:
        os.chmod(scratch, 0o777)
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "livedump", "--pid", str(vm.pid), str(scratch / "x.vmcore")],
            capture_output=True, timeout=60)
        assert r.returncode == 6
        assert r.stderr == f"livedump: may not inspect PID {vm.pid} " \
                           f"(run as its owner or root)\n".encode()
        assert vm.status() == "running"
        assert os.listdir(scratch) == []


def test_sigkill_mid_dump_the_guardian_resumes_the_vm(scratch, qemu):
    """SIGKILL gives livedump no chance to resume; its guardian process does."""
    with VM(memory="1G", qemu=qemu) as vm:
        # A stall limit far past the wait: only livedump's death can explain the resume.
        proc, fd = blocked_dump(vm, "--stall-timeout", "600")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.close(fd)
        wait_for_status(vm, "running", seconds=60)


def test_livedump_only_reads_and_pauses(scratch, qemu):
    """Every monitor command livedump sends is a query, stop, cont or a read-only HMP info."""
    with VM(memory="512M", qemu=qemu) as vm, QMPProxy(vm.socket) as proxy:
        r = livedump("--pid", str(vm.pid), "--qmp", str(proxy.path), str(scratch / "x.vmcore"))
        assert r.returncode == 0, r.stderr
        commands = [m["execute"] for m in proxy.sent]
        assert set(commands) <= {"qmp_capabilities", "query-status", "query-target", "stop",
                                 "cont", "human-monitor-command", "getfd",
                                 "dump-guest-memory", "query-memory-devices"}
        # QEMU's notes come from a dump of one page, into the fd livedump passed:
        # a page QEMU has (a dump of a hole would create it).
        dumps = [m["arguments"] for m in proxy.sent if m["execute"] == "dump-guest-memory"]
        assert len(dumps) <= 1
        for d in dumps:
            assert d["begin"] % 4096 == 0
            assert d == {"paging": False, "protocol": "fd:livedump-notes",
                         "begin": d["begin"], "length": 4096}
        assert commands.count("stop") == commands.count("cont") == 1
        hmp = [m["arguments"]["command-line"] for m in proxy.sent
               if m["execute"] == "human-monitor-command"]
        assert {line for line in hmp if not line.startswith("gpa2hva 0x")} == {
            "info mtree -f", "info ramblock"}
