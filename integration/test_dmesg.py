"""``livedump dmesg`` on a real Linux guest that logs all the time (``livedump.kmsg=1``:
a line a second to /dev/kmsg): equal to makedumpfile's --dump-dmesg of
livedump's vmcore of the same paused guest; read while it runs, leaving it
running; following it. One guest for the module: it boots slowly under TCG.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import livedump
from .linux_guest import LinuxVM
from .test_kdump import rss_shmem

pytestmark = [pytest.mark.qemu, pytest.mark.linux]

ROOT = Path(__file__).resolve().parents[1]
_KMSG = re.compile(rb"LIVEDUMP-KMSG n=(\d+)")


@pytest.fixture(scope="module")
def guest():
    with LinuxVM(machine="q35", memory="512M", cmdline_extra=["livedump.kmsg=1"]) as vm:
        vm.wait_idle(timeout=300)
        yield vm


def last_kmsg(text: bytes) -> int:
    """The highest N of the guest's ``LIVEDUMP-KMSG n=N`` lines in ``text``."""
    return max((int(n) for n in _KMSG.findall(text)), default=0)


def read_until(follow: subprocess.Popen, done: Callable[[bytes], bool], seconds: float,
               seen: bytes = b"") -> bytes:
    """``seen`` and what ``follow`` prints next, read until ``done`` holds of it: on a
    slow host the follower takes its time, so the test waits for what it asserts."""
    deadline = time.monotonic() + seconds
    while not done(seen):
        assert time.monotonic() < deadline, seen[-500:]
        ready, _, _ = select.select([follow.stdout], [], [], 1)
        if ready:
            chunk = os.read(follow.stdout.fileno(), 65536)
            assert chunk, (follow.wait(), follow.stderr.read(), seen[-500:])
            seen += chunk
    return seen


def second_boot_logged(seen: bytes) -> bool:
    """A second kernel's log, from its start to its first ``LIVEDUMP-KMSG``."""
    if seen.count(b"] Linux version ") < 2:
        return False
    return b"LIVEDUMP-KMSG n=1\n" in seen[seen.rindex(b"] Linux version ") - 14:]


def test_dmesg_of_a_paused_guest_equals_makedumpfiles(guest, scratch):
    guest.command("stop")
    try:
        ours = livedump("dmesg", *guest.livedump_args())
        assert ours.returncode == 0, ours.stderr
        vmcore = scratch / "guest.vmcore"
        assert livedump("-q", *guest.livedump_args(), str(vmcore)).returncode == 0
    finally:
        guest.command("cont")
    theirs = scratch / "makedumpfile.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(theirs)], check=True,
                   capture_output=True)
    assert ours.stdout == theirs.read_bytes()
    assert b"LIVEDUMP-KMSG-BYTES tab\there caf\\xffffffc3\\xffffffa9 bell\\x07 end\n" \
        in ours.stdout
    assert last_kmsg(ours.stdout) >= 1


@pytest.mark.parametrize("pause", [False, True], ids=["running", "paused"])
def test_dmesg_of_a_running_guest_leaves_it_running(guest, pause):
    before = livedump("dmesg", *guest.livedump_args())
    assert before.returncode == 0, before.stderr
    started = time.monotonic()
    r = livedump("dmesg", *guest.livedump_args(), *(["--pause"] if pause else []), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert guest.status() == "running"
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert records[0]["text"].startswith("Linux version")
    sequences = [rec["sequence"] for rec in records]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    [awkward] = [rec for rec in records if rec["text"].startswith("LIVEDUMP-KMSG-BYTES")]
    assert (awkward["level"], awkward["facility"], awkward["text"]) == (
        4, 1, "LIVEDUMP-KMSG-BYTES tab\there café bell\x07 end")
    assert awkward["caller"].startswith("T")
    # The guest logged on, and a read later sees it.
    deadline = started + 120
    while last_kmsg(livedump("dmesg", *guest.livedump_args()).stdout) <= \
            last_kmsg(r.stdout):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_follow_prints_what_the_guest_logs_after_it_started(guest):
    start = last_kmsg(livedump("dmesg", *guest.livedump_args()).stdout)
    follow = subprocess.Popen([sys.executable, "-m", "livedump", "dmesg", "--follow",
                               *guest.livedump_args()], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT)
    seen = b""
    try:
        # A line logged after it started: n two past the last one before it.
        seen = read_until(follow, lambda seen: last_kmsg(seen) >= start + 2, 120)
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert follow.returncode == 130, err
    assert err == b"livedump: interrupted by SIGINT\n"
    # Each message once, in order.
    numbers = [int(n) for n in _KMSG.findall(seen)]
    assert numbers == list(range(1, numbers[-1] + 1))
    assert guest.status() == "running"


def test_a_vmcore_named_like_the_command_is_written_as_such(guest, scratch):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = livedump("--pid", str(guest.pid), "dmesg", cwd=scratch, env=env)
    assert refused.returncode == 2
    assert list(scratch.iterdir()) == []
    r = livedump("-q", *guest.livedump_args(), "./dmesg", cwd=scratch, env=env)
    assert r.returncode == 0, r.stderr
    assert (scratch / "dmesg").read_bytes()[:4] == b"\x7fELF"


def test_after_a_reboot_the_running_kernels_log_is_read_and_followed(scratch):
    # A warm reset leaves the first kernel's VMCOREINFO and log in RAM, intact:
    # the vCPUs' page tables (the monitor's info registers) say which kernel runs.
    with LinuxVM(machine="q35", memory="512M", cmdline_extra=["livedump.kmsg=1"],
                 extra=["-action", "reboot=reset"]) as vm:
        vm.wait_idle(timeout=300)
        follow = subprocess.Popen([sys.executable, "-m", "livedump", "dmesg", "--follow",
                                   *vm.livedump_args()], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=ROOT)
        try:
            # The follower found the first kernel and prints its log.
            seen = read_until(follow, lambda seen: _KMSG.search(seen) is not None, 120)
            vm.command("system_reset")
            # It noticed the reboot and followed the second kernel's log from its
            # start (the guest boots again meanwhile: the boot's own limit).
            seen = read_until(follow, second_boot_logged, 300, seen)
            follow.send_signal(signal.SIGINT)
            rest, err = follow.communicate(timeout=30)
            seen += rest
        finally:
            follow.kill()
        assert b"the guest rebooted" in err, err
        # Both boots' logs, each from its start.
        assert seen.count(b"] Linux version ") == 2, err

        vm.command("stop")
        ours = livedump("dmesg", *vm.livedump_args())
        assert ours.returncode == 0, ours.stderr
        vmcore = scratch / "rebooted.vmcore"
        assert livedump("-q", *vm.livedump_args(), str(vmcore)).returncode == 0
    theirs = scratch / "makedumpfile.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(theirs)], check=True,
                   capture_output=True)
    assert ours.stdout == theirs.read_bytes()
    assert ours.stdout.count(b"] Linux version ") == 1


def test_dmesg_through_ptrace_with_no_monitor():
    # No QMP monitor: QEMU's RAM map from its own structures (its debug info).
    from . import qemus

    build = qemus.debug_builds().get("7.2-debug")
    if build is None:
        pytest.skip("no QEMU 7.2 debug build (integration/setup --test builds it)")
    [binary] = build.command()
    with LinuxVM(machine="q35", memory="512M", qemu=binary, livedump_socket=False) as vm:
        vm.wait_idle(timeout=300)
        r = livedump("dmesg", "--pid", str(vm.pid))
        assert r.returncode == 0, r.stderr
        assert vm.status() == "running"
        paused = livedump("dmesg", "--pause", "--pid", str(vm.pid))
        assert paused.returncode == 0, paused.stderr
        assert vm.status() == "running"
    assert r.stdout.startswith(b"[    0.000000] Linux version ")
    assert paused.stdout.startswith(r.stdout)  # and what was logged since


def test_dmesg_of_a_guest_on_shared_memory_creates_no_page():
    # RAM in a memfd, as vhost-user setups have it: the VMCOREINFO search and
    # the log's reads go through the dump's extents, reading the file where QEMU
    # has not mapped it, so QEMU's shared memory stays as it was (a search
    # through QEMU grew it to all of guest RAM). Paused, it must not move at all;
    # running, only by what the guest itself touches.
    extra = ["-object", "memory-backend-memfd,id=ram0,size=512M,share=on",
             "-machine", "memory-backend=ram0"]
    with LinuxVM(machine="q35", memory="512M", touch_mib=32, extra=extra) as vm:
        vm.wait_idle(timeout=300)
        vm.command("stop")
        try:
            shmem = rss_shmem(vm.pid)
            for args in ([], ["--pause"]):
                out = livedump("dmesg", *vm.livedump_args(), *args)
                assert out.returncode == 0, out.stderr
                assert b"Linux version " in out.stdout, args
                assert rss_shmem(vm.pid) == shmem, args
        finally:
            vm.command("cont")
        shmem = rss_shmem(vm.pid)
        out = livedump("dmesg", *vm.livedump_args())
        assert out.returncode == 0, out.stderr
        assert b"Linux version " in out.stdout
        assert rss_shmem(vm.pid) - shmem < 64 << 20  # the guest touches 32 MiB, no more
        assert vm.status() == "running"
