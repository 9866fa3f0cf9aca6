"""``--live --format kdump``: a filtered, compressed vmcore of one instant (slow: TCG).

The live ELF vmcore goes into a spool no name leads to, and the kdump file is
written from it. The differential: livedump's kdump file keeps exactly the
pages makedumpfile keeps from that very spool (the same instant), each byte
for byte, and the same bitmaps; the guest, which logs and so writes its memory
all the time, is never sent ``stop`` and runs on. Killed at any point,
livedump leaves no file at all, and the guest whole.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kdump_file import read, unflatten

from . import qemus
from .conftest import livedump
from .health import uffd_wp_mappings, write_protected_pages
from .linux_guest import LinuxVM, kernel_release
from .test_analysis import crash, drgn, vmlinux  # noqa: F401 (a fixture)
from .test_kdump import elf_pages
from .test_live import SWEEPING, assert_left_whole, live_args, set_user_capabilities
from .test_live_pause import TRACE, sent
from .vm import VM, Marker

pytestmark = [pytest.mark.qemu]
QEMUS = qemus.available()
_KMSG = re.compile(r"LIVEDUMP-KMSG n=(\d+)")

# livedump with its spool given a name (sys.argv[1]) that stays: the ELF vmcore
# the kdump file was written from, for makedumpfile to filter too.
KEPT_SPOOL = """
import os, sys
from livedump import cli
from livedump.transfer import spool
spool._open_unnamed = lambda directory: os.open(
    sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
sys.exit(cli.main(sys.argv[2:]))
"""

# livedump that, right after the snapshot point, is not scheduled for a second
# (a loaded host): meanwhile QEMU fills the stream's pipe and the guest runs on.
LATE_AFTER_THE_POINT = """
import sys, time
from livedump import cli
from livedump.live.stream import MigrationStream
wait_snapshot = MigrationStream.wait_snapshot
def late(self):
    wait_snapshot(self)
    time.sleep(1)
MigrationStream.wait_snapshot = late
sys.exit(cli.main(sys.argv[1:]))
"""

# livedump made to die by SIGKILL once the method sys.argv[1] of sys.argv[2] in
# module sys.argv[3] returned.
KILLED_AFTER = """
import importlib, os, signal, sys
from livedump import cli
owner = getattr(importlib.import_module(sys.argv[3]), sys.argv[2])
method = getattr(owner, sys.argv[1])
def killed(*args):
    method(*args)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, sys.argv[1], killed)
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module", params=list(QEMUS), ids=list(QEMUS))
def guest(request):
    """A Linux guest with user memory, that logs a line every tenth of a second."""
    with LinuxVM(machine="q35", memory="512M", touch_mib=32, qemu=QEMUS[request.param],
                 cmdline_extra=["livedump.kmsg=0.1"], extra=TRACE) as vm:
        vm.wait_idle(timeout=300)
        yield vm


def logged(vm: LinuxVM) -> int:
    """The guest's last ``LIVEDUMP-KMSG n=N``, from its log as ``livedump dmesg`` reads it."""
    r = livedump("dmesg", *vm.livedump_args())
    assert r.returncode == 0, r.stderr
    return max((int(n) for n in _KMSG.findall(r.stdout.decode(errors="replace"))), default=0)


def assert_runs_on(vm: LinuxVM) -> None:
    """Running, nothing left write-protected, and still logging."""
    assert vm.status() == "running"
    assert not uffd_wp_mappings(vm.pid) and not write_protected_pages(vm.pid)
    before = logged(vm)
    assert before > 0
    deadline = time.monotonic() + 60
    while logged(vm) <= before + 3:
        assert time.monotonic() < deadline, f"the guest stopped logging at {logged(vm)}"
        time.sleep(0.2)


def makedumpfile(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["makedumpfile", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.linux
def test_live_kdump_keeps_what_makedumpfile_keeps_from_its_spool(guest, scratch):
    ours, spool, theirs = scratch / "live.kdump", scratch / "spool.elf", scratch / "theirs"
    done = len(sent(guest))
    r = subprocess.run([sys.executable, "-c", KEPT_SPOOL, str(spool), *guest.livedump_args(),
                        "--live", "--format", "kdump", "-d", "31", "--compress", "zlib",
                        "--json", str(ours)], capture_output=True, timeout=600)
    assert r.returncode == 0 and b"warning" not in r.stderr, r.stderr
    commands = sent(guest)[done:]
    assert "migrate" in commands and "stop" not in commands, commands
    report = json.loads(r.stdout)
    assert report["live"] is True and report["format"] == "kdump"
    assert report["vmcoreinfo"]["source"] == "guest", report["vmcoreinfo"]
    k = report["kdump"]
    assert 0 < k["spool_bytes"] <= spool.stat().st_blocks * 512
    assert oct(ours.stat().st_mode & 0o777) == "0o600"
    assert_runs_on(guest)
    # The same instant: makedumpfile on the ELF vmcore the kdump file came from.
    makedumpfile("-c", "-d", "31", str(spool), str(theirs))
    a, b = read(ours.read_bytes()), read(theirs.read_bytes())
    assert (a.max_mapnr, a.ram, a.dumpable) == (b.max_mapnr, b.ram, b.dumpable)
    kept = a.pfns(a.dumpable)
    assert k["kept_pages"] == len(kept)
    assert k["excluded_pages"]["free"] > len(kept), k
    assert k["excluded_pages"]["user"] >= 32 << 8, k
    for pfn in kept:
        assert a.page_at(pfn) == b.page_at(pfn), pfn
    dmesg = scratch / "dmesg"
    makedumpfile("--dump-dmesg", str(ours), str(dmesg))
    assert _KMSG.search(dmesg.read_text(errors="replace"))


@pytest.mark.linux
def test_live_elf_at_a_dump_level_holds_what_makedumpfile_keeps_from_its_spool(guest, scratch):
    # As makedumpfile -E at that level, less its zero-filled runs (see test_kdump).
    ours, spool, theirs = scratch / "live.elf", scratch / "spool.elf", scratch / "theirs"
    done = len(sent(guest))
    r = subprocess.run([sys.executable, "-c", KEPT_SPOOL, str(spool), *guest.livedump_args(),
                        "--live", "-d", "31", "--json", str(ours)], capture_output=True,
                       timeout=600)
    assert r.returncode == 0 and b"warning" not in r.stderr, r.stderr
    assert "stop" not in sent(guest)[done:]
    report = json.loads(r.stdout)
    assert report["live"] is True and report["vmcoreinfo"]["source"] == "guest"
    left = report["pages"]["excluded_pages"]
    assert report["pages"]["spool_bytes"] > 0
    # The blocks kept, each where QEMU holds it (as the normal mode reports them).
    maps = [tuple(int(x, 16) for x in line.split()[0].split("-"))
            for line in Path(f"/proc/{guest.pid}/maps").read_text().splitlines()]
    assert report["memory_bytes"] < 512 << 20
    assert all(any(lo <= b["hva"] and b["hva"] + b["size"] <= hi for lo, hi in maps)
               for b in report["blocks"])
    makedumpfile("-c", "-d", "31", str(spool), str(theirs))
    a, b = elf_pages(ours), read(theirs.read_bytes())
    kept = b.pfns(b.dumpable)
    assert sorted(a) == kept
    assert all(a[p] == b.page_at(p) for p in kept)
    assert left["free"] > len(kept)
    assert_runs_on(guest)


@pytest.mark.linux
@pytest.mark.analysis
def test_crash_and_drgn_read_a_live_kdump(guest, scratch, vmlinux):  # noqa: F811
    path = scratch / "live.zstd"
    r = livedump(*guest.livedump_args(), "--live", "--format", "kdump", "-d", "31", str(path))
    assert r.returncode == 0, r.stderr
    out = crash(vmlinux, path, "sys", "log", "bt -a", "kmem -i")
    assert kernel_release() in out["sys"]
    assert "LIVEDUMP-KMSG" in out["log"]
    assert "PID: " in out["bt -a"], out["bt -a"]  # (the guest is busy: not PID 0 always)
    assert "TOTAL MEM" in out["kmem -i"]
    r2 = drgn(vmlinux, path)
    assert r2.returncode == 0, r2.stderr
    assert f"release {kernel_release()}" in r2.stdout


@pytest.mark.linux
def test_live_sends_qemu_nothing_while_its_stream_is_unread(guest, scratch):
    # Under TCG a vCPU that takes an interrupt holds QEMU's big lock while it
    # pushes the frame; on a page not yet sent, it waits for QEMU's migration
    # thread, which waits for livedump to read the stream. A monitor command
    # sent then waits for that lock: the VM hangs until livedump gives up. It
    # happens in some runs only (what the vCPU does as the pipe fills): 8 runs.
    out = scratch / "late.vmcore"
    for attempt in range(8):
        r = subprocess.run([sys.executable, "-c", LATE_AFTER_THE_POINT, "--pid", str(guest.pid),
                            "--qmp-timeout", "30", "--live", "--force", str(out)],
                           capture_output=True, timeout=600)
        assert r.returncode == 0, (attempt, r.stderr)
    assert_runs_on(guest)


@pytest.mark.linux
def test_live_kdump_of_a_paused_guest_is_the_normal_ways(guest, scratch):
    # Paused, the guest cannot change: the normal way, no snapshot, no spool.
    elf, ours, theirs = scratch / "elf", scratch / "ours", scratch / "theirs"
    guest.command("stop")
    try:
        assert livedump(*guest.livedump_args(), "--live", str(elf)).returncode == 0
        r = livedump(*guest.livedump_args(), "--live", "--format", "kdump", "-d", "31",
                     "--compress", "zlib", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        assert guest.status() == "paused"
    finally:
        guest.command("cont")
    assert "spool_bytes" not in json.loads(r.stdout)["kdump"]
    makedumpfile("-c", "-d", "31", str(elf), str(theirs))
    a, b = read(ours.read_bytes()), read(theirs.read_bytes())
    assert (a.max_mapnr, a.ram, a.dumpable) == (b.max_mapnr, b.ram, b.dumpable)
    assert all(a.page_at(p) == b.page_at(p) for p in a.pfns(a.dumpable))


@pytest.mark.linux
def test_live_kdump_to_standard_output_is_flattened(guest, scratch):
    stream, restored, spools = scratch / "flat", scratch / "restored", scratch / "tmp"
    spools.mkdir()
    with open(stream, "wb") as f:
        r = livedump(*guest.livedump_args(), "--live", "--format", "kdump", "-d", "31", "-",
                     stdout=f, env={**os.environ, "TMPDIR": str(spools)})
    assert r.returncode == 0, r.stderr
    assert os.listdir(spools) == []
    with open(stream, "rb") as f:
        subprocess.run(["makedumpfile", "-R", str(restored)], stdin=f, check=True,
                       capture_output=True, timeout=300)
    assert restored.read_bytes() == unflatten(stream.read_bytes())
    a = read(restored.read_bytes())
    assert a.vmcoreinfo.startswith(b"OSRELEASE=") and a.pfns(a.dumpable)
    assert_runs_on(guest)


@pytest.mark.parametrize("when", ["migrate", "seal"])
def test_sigkill_leaves_no_file_and_the_guest_whole(scratch, qemu, when):
    """Killed once the snapshot started (QEMU writes into the pipe), or once the
    spool is written and the kdump file begun: no file left, and (the guardian
    reading the stream to its end) the guest runs on whole."""
    owner = (("Monitor", "livedump.qmp.monitor") if when == "migrate"
             else ("Spool", "livedump.transfer.spool"))
    with VM(**SWEEPING, qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        out = scratch / "k.kdump"
        r = subprocess.run([sys.executable, "-c", KILLED_AFTER, when, *owner,
                            *live_args(vm, out, "--format", "kdump")],
                           stderr=subprocess.PIPE, timeout=180)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert r.stderr.startswith(b"livedump: died while "), r.stderr
        assert_left_whole(vm, before, scratch)


def test_full_disk_one_line_and_nothing_left(small_disk, qemu):
    # Random data: more than the disk has room for in the spool.
    with VM(**SWEEPING, markers=[Marker(0x1000_0000, os.urandom(32 << 20))], qemu=qemu) as vm:
        before = set_user_capabilities(vm)
        r = livedump(*live_args(vm, small_disk / "x.kdump", "--format", "kdump"), timeout=180)
        assert r.returncode == 8, r.stderr
        assert re.fullmatch(rb"livedump: writing the spool in \S+: No space left on device\n",
                            r.stderr), r.stderr
        assert os.listdir(small_disk) == []
        assert_left_whole(vm, before, small_disk)
