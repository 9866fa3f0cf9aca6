"""--core: a guest vmcore out of the core file of a QEMU process.

Each debug build (integration/qemus.py) runs the counting guest with markers
placed by ``-device loader``, paused; QEMU's own ``dump-guest-memory`` of
that state is the reference. A core of it by ``gcore`` (QEMU runs on) and
the kernel's core after ``SIGABRT`` (QEMU is gone) must each give a vmcore
with the same PT_LOADs, every byte, and under TCG the same ELF identity and
CPU notes, read from QEMU's memory in the core; the same core compressed
with zstd, as systemd-coredump keeps it, must give the same vmcore.
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from livedump.errors import CoreFileError, DebugInfoError, NoGuestRam, NotQemu
from livedump.vmcore.notes import parse

from . import qemus
from .conftest import livedump
from .linux_guest import LinuxVM
from .test_dump import MARKERS, assert_markers
from .test_linux_guest import kernel_vmcoreinfo
from .test_ptrace_cpu import assert_same_notes
from .test_ptrace_qemus import first_mib
from .vm import COUNTING_PC, VM, kvm_usable
from .vmcore import first_difference, identity, notes, read_phys

DEBUG = qemus.debug_builds()
ACCELS = ["tcg"] + (["kvm"] if kvm_usable() else [])
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not DEBUG, reason="no QEMU with debug info: run "
                       "integration/build-qemu-debug.sh [10.0]"),
    pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb (gcore)"),
]


@pytest.fixture
def cores(tmp_path: Path) -> Path:
    """A directory for cores: on disk, as they are large and mostly zeros."""
    return tmp_path


def gcore(pid: int, directory: Path) -> Path:
    """A core of the running process ``pid`` by gdb's gcore (it runs on)."""
    prefix = directory / "gcore"
    subprocess.run(["gcore", "-o", str(prefix), str(pid)], check=True,
                   capture_output=True, timeout=300)
    return directory / f"gcore.{pid}"


@contextlib.contextmanager
def kernel_cores(directory: Path) -> Iterator[None]:
    """The kernel writes the cores of this test's children into ``directory``:
    the core pattern and the limit set meanwhile, and put back after."""
    if not os.access(CORE_PATTERN, os.W_OK):
        pytest.skip("cannot set the kernel's core pattern (not root)")
    pattern, limit = CORE_PATTERN.read_text(), resource.getrlimit(resource.RLIMIT_CORE)
    CORE_PATTERN.write_text(f"{directory}/core.%p")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (limit[1], limit[1]))
        yield
    finally:
        CORE_PATTERN.write_text(pattern)
        resource.setrlimit(resource.RLIMIT_CORE, limit)


def abort(vm: VM, directory: Path) -> Path:
    """SIGABRT to QEMU, as an assertion would; the kernel's core of it."""
    os.kill(vm.pid, signal.SIGABRT)
    assert vm.process.wait(timeout=300) == -signal.SIGABRT
    core = directory / f"core.{vm.pid}"
    assert core.exists(), f"no core in {directory}: {os.listdir(directory)}"
    return core


def compressed(core: Path) -> Path:
    """The core as systemd-coredump keeps it: zstd, one frame streamed (no
    content size), a checksum, no seek table."""
    out = Path(f"{core}.zst")
    with open(core, "rb") as src, open(out, "wb") as dst:
        zstandard.ZstdCompressor(level=1, write_checksum=True, threads=-1).copy_stream(src, dst)
    return out


def assert_equals_qemus(ours: Path, theirs: Path, accel: str = "tcg") -> None:
    assert first_difference(ours, theirs) is None
    assert_markers(ours, MARKERS[:2])
    if accel == "tcg":
        assert identity(ours) == identity(theirs)
        assert_same_notes(parse(first_mib(ours)), parse(first_mib(theirs)))


def dump_core(core: Path, out: Path, *args: str) -> dict:
    r = livedump("--core", str(core), "--json", *args, str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def paused_vm(series: str, accel: str = "tcg", memory: str = "512M", markers=MARKERS[:2],
              extra: tuple[str, ...] = ()) -> VM:
    return VM(qemu=str(DEBUG[series].binary), platform=COUNTING_PC, memory=memory,
              accel=accel, markers=list(markers), extra=["-smp", "2", *extra],
              livedump_socket=False)


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("series", DEBUG)
def test_gcore_gives_qemus_own_dump(scratch, cores, series, accel):
    """gcore of a paused QEMU: the vmcore is QEMU's own dump, plain, compressed,
    and written to standard output."""
    with paused_vm(series, accel) as vm:
        vm.command("stop")
        theirs = scratch / "qemu.vmcore"
        vm.own_dump(theirs)  # Under KVM this also has QEMU fetch the registers.
        core = gcore(vm.pid, cores)
    ours = scratch / "ours.vmcore"
    report = dump_core(core, ours)
    assert_equals_qemus(ours, theirs)
    assert report["via"] == "core" and report["pid"] == vm.pid
    assert report["cpu_notes"].startswith(
        "CORE, QEMU notes from QEMU's memory (" + ("TCG" if accel == "tcg" else "KVM"))
    assert os.stat(ours).st_mode & 0o777 == 0o600

    zst = scratch / "zst.vmcore"
    dump_core(compressed(core), zst)
    assert_equals_qemus(zst, theirs)
    # Every note the same, but livedump's own (which names the core).
    assert [n for n in notes(zst) if n[0] != "LIVEDUMP"] == \
        [n for n in notes(ours) if n[0] != "LIVEDUMP"]

    with open(scratch / "piped.vmcore", "wb") as f:
        r = livedump("--core", str(core), "-", stdout=f)
    assert r.returncode == 0, r.stderr
    assert_equals_qemus(scratch / "piped.vmcore", theirs)

    r = livedump("--core", str(core), str(ours))
    assert r.returncode == 7 and "exists" in r.stderr.decode()
    assert livedump("--core", str(core), "--force", "-q", str(ours)).returncode == 0


@pytest.mark.parametrize("series", DEBUG)
def test_kernels_core_after_sigabrt_gives_qemus_own_dump(scratch, cores, series):
    """The kernel's core of a QEMU that aborted, as a crash leaves it: the vmcore
    is the dump QEMU made just before; compressed, the same."""
    with kernel_cores(cores), paused_vm(series) as vm:
        vm.command("stop")
        theirs = scratch / "qemu.vmcore"
        vm.own_dump(theirs)
        core = abort(vm, cores)
    ours = scratch / "ours.vmcore"
    report = dump_core(core, ours)
    assert_equals_qemus(ours, theirs)
    # The kernel left out what was never written, as holes: read is far less.
    assert report["read_bytes"] < report["memory_bytes"] // 4
    zst = scratch / "zst.vmcore"
    dump_core(compressed(core), zst)
    assert_equals_qemus(zst, theirs)


def test_core_without_the_guests_ram_is_refused(scratch, cores):
    """QEMU marks its RAM not to be dumped: gcore and the kernel leave it out."""
    series = next(iter(DEBUG))
    with kernel_cores(cores), paused_vm(series, memory="128M", markers=(),
                                        extra=("-machine", "dump-guest-core=off")) as vm:
        vm.command("stop")
        by_gdb = gcore(vm.pid, cores)
        by_kernel = abort(vm, cores)
    for core in (by_gdb, by_kernel):
        r = livedump("--core", str(core), str(scratch / "out"))
        assert r.returncode == NoGuestRam.exit_code, r.stderr
        assert r.stderr.decode().count("\n") == 1 and "dump-guest-core=off" in r.stderr.decode()
        assert not (scratch / "out").exists()


def test_truncated_core_is_refused(scratch, cores):
    """Cut short in the guest's RAM: refused, plain and compressed, and nothing left."""
    series = next(iter(DEBUG))
    with kernel_cores(cores), paused_vm(series, memory="256M", markers=()) as vm:
        vm.command("stop")
        core = abort(vm, cores)
    zst = compressed(core)
    os.truncate(core, os.path.getsize(core) * 3 // 4)
    os.truncate(zst, os.path.getsize(zst) * 3 // 4)
    for path in (core, zst):
        r = livedump("--core", str(path), str(scratch / "out"))
        assert r.returncode == CoreFileError.exit_code, r.stderr
        assert r.stderr.decode().count("\n") == 1 and "truncated" in r.stderr.decode()
        assert not (scratch / "out").exists()


def test_core_of_another_program_is_refused(scratch, cores):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        core = gcore(sleeper.pid, cores)
    finally:
        sleeper.kill()
        sleeper.wait()
    r = livedump("--core", str(core), str(scratch / "out"))
    assert r.returncode == NotQemu.exit_code, r.stderr
    assert "not of a QEMU" in r.stderr.decode() and r.stderr.decode().count("\n") == 1
    r = livedump("--core", "/etc/hostname", str(scratch / "out"))
    assert r.returncode == CoreFileError.exit_code and b"not an ELF file" in r.stderr


@pytest.mark.skipif(len(DEBUG) < 2, reason="needs two debug builds")
def test_debug_info_of_another_build_is_refused(scratch, cores):
    one, other = list(DEBUG)[:2]
    with kernel_cores(cores), paused_vm(one, memory="128M", markers=()) as vm:
        vm.command("stop")
        core = abort(vm, cores)
    r = livedump("--core", str(core), "--debug-file", str(DEBUG[other].binary),
                 str(scratch / "out"))
    assert r.returncode == DebugInfoError.exit_code, r.stderr
    assert "refusing it" in r.stderr.decode() and r.stderr.decode().count("\n") == 1


def test_core_without_the_binarys_elf_header_uses_the_file(scratch, cores):
    """A coredump_filter without ELF headers (bit 4): the core has no build-id
    of QEMU, whose binary on disk then gives its header and layout."""
    series = next(iter(DEBUG))
    with kernel_cores(cores), paused_vm(series, memory="256M", markers=MARKERS[:1]) as vm:
        Path(f"/proc/{vm.pid}/coredump_filter").write_text("0x23")
        vm.command("stop")
        theirs = scratch / "qemu.vmcore"
        vm.own_dump(theirs)
        core = abort(vm, cores)
    ours = scratch / "ours.vmcore"
    dump_core(core, ours)
    assert first_difference(ours, theirs) is None
    assert_markers(ours, MARKERS[:1])
    assert identity(ours) == identity(theirs)


@pytest.mark.linux
def test_crashed_linux_guests_core_has_its_memory_and_vmcoreinfo(scratch, cores):
    """QEMU aborts under a running Linux guest: the vmcore from its core has the
    guest's markers and the kernel's own VMCOREINFO, found in guest RAM."""
    series = next(iter(DEBUG))
    with kernel_cores(cores), LinuxVM(qemu=str(DEBUG[series].binary), memory="1G",
                                      guest_markers=2) as vm:
        vm.wait_ready(timeout=300)
        vm.wait_idle(timeout=300)
        markers, facts = vm.guest_marker_list(), vm.kernel_facts()
        assert len(markers) == 2 and facts is not None
        core = abort(vm, cores)
    ours = scratch / "ours.vmcore"
    report = dump_core(core, ours)
    for m in markers:
        assert read_phys(ours, m.gpa, len(m.text)) == m.text.encode(), hex(m.gpa)
    [found] = [desc for name, _, desc in notes(ours) if name == "VMCOREINFO"]
    assert found == kernel_vmcoreinfo(ours, facts)
    assert report["vmcoreinfo"]["source"] == "guest"
    assert report["cpu_notes"].startswith("CORE, QEMU notes from QEMU's memory (TCG")


def test_core_of_a_qemu_replaced_since_needs_its_debug_file(scratch, cores, tmp_path):
    """QEMU's binary is gone from disk since the crash (an upgrade): the core's
    build-id asks for that build's debug info, which --debug-file then gives."""
    series = next(iter(DEBUG))
    copy = tmp_path / "bin" / "qemu-system-x86_64"
    copy.parent.mkdir()
    shutil.copy2(DEBUG[series].binary, copy)
    with kernel_cores(cores), VM(qemu=str(copy), platform=COUNTING_PC, memory="256M",
                                 markers=MARKERS[:1], livedump_socket=False) as vm:
        vm.command("stop")
        theirs = scratch / "qemu.vmcore"
        vm.own_dump(theirs)
        core = abort(vm, cores)
    copy.unlink()
    # No layout cached for the build (else neither binary nor debug info is needed).
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = livedump("--core", str(core), str(scratch / "out"), env=env)
    assert r.returncode == DebugInfoError.exit_code, r.stderr
    assert "--debug-file" in r.stderr.decode() and r.stderr.decode().count("\n") == 1
    ours = scratch / "ours.vmcore"
    r = livedump("--core", str(core), "--debug-file", str(DEBUG[series].binary), str(ours),
                 env=env)
    assert r.returncode == 0, r.stderr
    assert first_difference(ours, theirs) is None
    assert identity(ours) == identity(theirs)
    # Its layout now cached by build-id: the core alone is enough.
    r = livedump("--core", str(core), "--force", str(ours), env=env)
    assert r.returncode == 0, r.stderr
