"""Pages that hold nothing are neither read nor created (issue 14).

A guest that writes its memory all the time (integration/firmware.py's
sweeper, 256 MiB from 1 GiB up, and markers QEMU loads at power-on) on
shared, file-backed and hugetlb RAM, and on RAM QEMU's own dump has read
once. Each test compares with QEMU's own dump of the same paused VM where
QEMU can dump it, and measures what the dump cost QEMU and the host:
QEMU's RssShmem, the host's free huge pages.
"""

import contextlib
import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kdump_file import KdumpFile, read

from . import qemus
from .conftest import livedump
from .counting import wait_nonzero
from .firmware import SWEEP_COUNTER, SWEEP_END, SWEEP_START, SWEEP_STEP
from .vm import SWEEPING_PC, VM, Marker, kvm_usable
from .vmcore import first_difference, loads, read_phys

pytestmark = pytest.mark.qemu

GiB, MiB = 1 << 30, 1 << 20
HUGE = 2 * MiB
MARKERS = [
    Marker(0x0010_0000, b"livedump marker: 1 MiB"),
    Marker(0x1000_0000, os.urandom(64 << 10)),
    Marker(0x7FF0_0000, b"livedump marker: near the top of a 2 GiB guest"),
]
ACCEL = "kvm" if kvm_usable() else "tcg"


def rss_shmem(pid: int) -> int:
    """QEMU's resident shared memory, in bytes: what reading its shared pages grows."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("RssShmem:"))
    return int(line.split()[1]) * 1024


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


@contextlib.contextmanager
def huge_page_pool(pages: int) -> Iterator[None]:
    """The host's pool of 2 MiB pages set to ``pages``, and put back after."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    saved = knob.read_text()
    knob.write_text(f"{pages}\n")
    try:
        if meminfo("HugePages_Total") < pages:
            pytest.skip(f"the host could not give {pages} huge pages")
        yield
    finally:
        knob.write_text(saved)


def qemu_10() -> str | None:
    """A wrapper that starts QEMU 10.0 as its own process (integration/qemus.py), if here."""
    qemu = qemus.available().get("10.0")
    if qemu is None:
        return None
    return shlex.join(qemu.command())


QEMUS = ["7.2"] + (["10.0"] if qemu_10() else [])


@contextlib.contextmanager
def sweeping(extra: list[str], series: str, scratch: Path) -> Iterator[VM]:
    """A 2 GiB q35 guest on the RAM backend ``extra`` says, sweeping, then paused."""
    binary = None
    if series != "7.2":
        binary = scratch / "qemu-10.0"
        binary.write_text(f'#!/bin/sh\nexec {qemu_10()} "$@"\n')
        binary.chmod(0o755)
    with VM(machine="q35", memory="2G", platform=SWEEPING_PC, markers=MARKERS, accel=ACCEL,
            extra=extra, qemu=str(binary) if binary else None) as vm:
        vm.wait_running(1)
        wait_nonzero(vm, SWEEP_COUNTER)
        vm.command("stop")
        assert vm.read_u32(SWEEP_COUNTER) > 0
        yield vm


def assert_guest_data(vmcore: Path, vm: VM) -> None:
    """The markers, and the sweeper's pages as the paused guest has them."""
    for m in MARKERS:
        assert read_phys(vmcore, m.gpa, len(m.data)) == m.data, f"marker at {m.gpa:#x}"
    count = vm.read_u32(SWEEP_COUNTER)
    assert read_phys(vmcore, SWEEP_COUNTER, 4) == count.to_bytes(4, "little")
    swept = read_phys(vmcore, SWEEP_START, SWEEP_END - SWEEP_START)
    assert swept.count(count.to_bytes(4, "little")) > 0  # the step the guest was on


def assert_sweeps_on(vm: VM) -> None:
    count = vm.read_u32(SWEEP_COUNTER)
    vm.command("cont")
    deadline = time.monotonic() + 10
    while vm.read_u32(SWEEP_COUNTER) == count:
        assert time.monotonic() < deadline, "the guest stopped sweeping"
        time.sleep(0.05)


def dump(vm: VM, out: Path) -> dict:
    r = livedump("--pid", str(vm.pid), "--json", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# Shared and file-backed RAM, each as QEMU maps it. (The file of a private
# mapping holds data the guest never wrote: its pages are the guest's too.)
BACKENDS = {
    "memfd": "memory-backend-memfd,id=ram0,size=2G,share=on",
    "shm-file": "memory-backend-file,id=ram0,size=2G,share=on,mem-path={file}",
    "shared-anonymous": "memory-backend-ram,id=ram0,size=2G,share=on",
    "private-file": "memory-backend-file,id=ram0,size=2G,share=off,mem-path={file}",
}
FILE_ONLY = Marker(0x6000_0000, b"livedump marker: in the file, never written by the guest")


@pytest.mark.parametrize("series", QEMUS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_memory_is_dumped_without_growing_qemu(scratch, backend, series):
    if series != "7.2" and backend not in ("memfd", "private-file"):
        pytest.skip("one shared and one file-backed backend on QEMU 10.0")
    backing = scratch / "ram"
    with open(backing, "wb") as f:  # sparse, one island of data
        f.truncate(2 * GiB)
        f.seek(FILE_ONLY.gpa)
        f.write(FILE_ONLY.data)
    extra = ["-object", BACKENDS[backend].format(file=backing),
             "-machine", "memory-backend=ram0"]
    with sweeping(extra, series, scratch) as vm:
        shmem, file_blocks = rss_shmem(vm.pid), os.stat(backing).st_blocks
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        report = dump(vm, ours)
        assert rss_shmem(vm.pid) == shmem
        assert os.stat(backing).st_blocks == file_blocks
        # Read: what the guest wrote (the sweep and a few MiB of the firmware's), not 2 GiB.
        assert report["read_bytes"] < (SWEEP_END - SWEEP_START) + 64 * MiB
        assert_guest_data(ours, vm)
        if backend.endswith("file"):
            assert read_phys(ours, FILE_ONLY.gpa, len(FILE_ONLY.data)) == FILE_ONLY.data
        vm.own_dump(theirs)  # Reads (and populates) it all.
        assert first_difference(ours, theirs) is None
        assert_sweeps_on(vm)


@pytest.mark.parametrize("series", QEMUS)
def test_after_qemus_own_dump_the_zero_page_is_not_read(scratch, series):
    """QEMU's dump maps the kernel's zero page (4 KiB or huge) wherever the
    guest never wrote: those pages are holes, not read."""
    with sweeping([], series, scratch) as vm:
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        vm.own_dump(theirs)
        report = dump(vm, ours)
        assert report["read_bytes"] < (SWEEP_END - SWEEP_START) + 64 * MiB
        assert first_difference(ours, theirs) is None
        assert_guest_data(ours, vm)
        assert os.stat(ours).st_blocks * 512 < 2 * (SWEEP_END - SWEEP_START)
        assert_sweeps_on(vm)


HUGETLB = ("memory-backend-memfd,id=ram0,size=2G,hugetlb=on,hugetlbsize=2M,share=on,"
           "reserve=off")


@pytest.mark.parametrize("series", QEMUS)
def test_hugetlb_without_reservation_takes_no_huge_page(scratch, series):
    """2 GiB of hugetlb memfd without reservation, on a pool far smaller: the
    dump takes none of the pool, where reading the holes used to take it all
    and fail."""
    # The sweep and the firmware's few pages fit; the guest's 1024 do not.
    with huge_page_pool(256), sweeping(["-object", HUGETLB, "-machine", "memory-backend=ram0"],
                                       series, scratch) as vm:
        free = meminfo("HugePages_Free")
        assert 0 < free <= 256  # far from the 1024 pages of the guest
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        report = dump(vm, ours)
        assert meminfo("HugePages_Free") == free
        # hugetlbfs cannot tell its holes (SEEK_DATA finds data everywhere): they are
        # read from the file, as zeros that create nothing, and not written.
        assert report["written_bytes"] < (SWEEP_END - SWEEP_START) + 64 * MiB
        assert_guest_data(ours, vm)
        # QEMU's dump of all of it would take the pool (and SIGBUS QEMU): of
        # what the sweep has written, which has its pages, it matches.
        swept = min(vm.read_u32(SWEEP_COUNTER) * SWEEP_STEP, SWEEP_END - SWEEP_START)
        swept -= swept % HUGE
        assert swept > 0
        vm.own_dump(theirs, begin=SWEEP_START, length=swept)
        assert meminfo("HugePages_Free") == free
        assert read_phys(ours, SWEEP_START, swept) == read_phys(theirs, SWEEP_START, swept)
        assert_sweeps_on(vm)


# --format kdump reads shared memory as the ELF path does (issue 15): its holes
# and QEMU's zero pages are zeros, never read through QEMU.
KDUMP_BACKENDS = {
    "memfd": BACKENDS["memfd"],
    "shared-anonymous": BACKENDS["shared-anonymous"],
    "hugetlb": HUGETLB,
}
PAGE = 4096


def kdump(vm: VM, out: Path, level: int) -> tuple[dict, KdumpFile]:
    # kdump files are x86_64's: the sweeper's protected mode would make QEMU's notes 386.
    r = livedump("--pid", str(vm.pid), "--arch", "x86_64", "--format", "kdump",
                 "-d", str(level), "--json", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), read(out.read_bytes())


def kdump_page(k: KdumpFile, pfn: int) -> bytes:
    """The page as the kdump file has it: zeros where it keeps none."""
    assert k.ram[pfn >> 3] >> (pfn & 7) & 1, f"pfn {pfn:#x} is not RAM in the kdump"
    return k.page_at(pfn) if k.dumpable[pfn >> 3] >> (pfn & 7) & 1 else bytes(PAGE)


def assert_kdump_is(k: KdumpFile, theirs: Path, begin: int = 0, end: int = 1 << 64) -> None:
    """Every page of QEMU's ELF dump ``theirs`` in ``[begin, end)`` is the kdump's."""
    with open(theirs, "rb") as f:
        for load in loads(theirs):
            start, stop = max(begin, load.paddr), min(end, load.paddr + load.filesz)
            for gpa in range(start, stop, PAGE):
                f.seek(load.offset + gpa - load.paddr)
                assert kdump_page(k, gpa // PAGE) == f.read(PAGE), f"page at {gpa:#x}"


def assert_kdump_guest_data(k: KdumpFile, vm: VM) -> None:
    """The markers and the sweep counter, as the paused guest has them."""
    def at(gpa: int, size: int) -> bytes:
        pages = b"".join(kdump_page(k, pfn)
                         for pfn in range(gpa // PAGE, -(-(gpa + size) // PAGE)))
        return pages[gpa % PAGE:gpa % PAGE + size]
    for m in MARKERS:
        assert at(m.gpa, len(m.data)) == m.data, f"marker at {m.gpa:#x}"
    assert at(SWEEP_COUNTER, 4) == vm.read_u32(SWEEP_COUNTER).to_bytes(4, "little")


@contextlib.contextmanager
def sweeping_on(backend: str, scratch: Path) -> Iterator[VM]:
    """:func:`sweeping` on one of :data:`KDUMP_BACKENDS`, with a small huge page pool
    for hugetlb (the guest's 1024 pages do not fit)."""
    pool = huge_page_pool(256) if backend == "hugetlb" else contextlib.nullcontext()
    extra = ["-object", KDUMP_BACKENDS[backend], "-machine", "memory-backend=ram0"]
    with pool, sweeping(extra, "7.2", scratch) as vm:
        yield vm


def own_dump_of(vm: VM, theirs: Path, hugetlb: bool) -> tuple[int, int]:
    """QEMU's own dump of the paused guest, and the guest-physical range it holds:
    all of it, or on hugetlb (where all would take the pool) what the sweep wrote."""
    if not hugetlb:
        vm.own_dump(theirs)
        return 0, 1 << 64
    swept = min(vm.read_u32(SWEEP_COUNTER) * SWEEP_STEP, SWEEP_END - SWEEP_START)
    swept -= swept % HUGE
    assert swept > 0
    vm.own_dump(theirs, begin=SWEEP_START, length=swept)
    return SWEEP_START, SWEEP_START + swept


@pytest.mark.parametrize("backend", KDUMP_BACKENDS)
def test_kdump_of_shared_memory_creates_no_page(scratch, backend):
    """-d 0, 1 and 31 of shared memory QEMU has mostly not mapped: QEMU's shared
    memory (or the host's huge page pool) as it was, and every page as QEMU's
    own dump of the same paused guest has it (nothing but zero pages can be
    left out: the firmware guest has no VMCOREINFO)."""
    hugetlb = backend == "hugetlb"
    with sweeping_on(backend, scratch) as vm:
        shmem, free = rss_shmem(vm.pid), meminfo("HugePages_Free")
        kdumps = {}
        for level in (0, 1, 31):
            report, kdumps[level] = kdump(vm, scratch / f"ours.d{level}", level)
            assert rss_shmem(vm.pid) == shmem, f"-d {level}"
            assert meminfo("HugePages_Free") == free, f"-d {level}"
            assert_kdump_guest_data(kdumps[level], vm)
            if not hugetlb:  # hugetlbfs cannot tell its holes: they are read, from the file
                assert report["read_bytes"] < (SWEEP_END - SWEEP_START) + 64 * MiB
        for level in (1, 31):
            assert kdumps[level].pfns(kdumps[level].dumpable) == \
                kdumps[0].pfns(kdumps[0].dumpable), f"-d {level}"
        theirs = scratch / "qemu.vmcore"
        begin, end = own_dump_of(vm, theirs, hugetlb)
        for k in kdumps.values():
            assert_kdump_is(k, theirs, begin, end)
        assert_sweeps_on(vm)


@pytest.mark.parametrize("backend", KDUMP_BACKENDS)
def test_elf_at_a_dump_level_of_shared_memory_creates_no_page(scratch, backend):
    """--format elf -d 31 looks for VMCOREINFO through all of guest memory (before
    the hold, and again inside it): as the copy reads it, creating no page."""
    hugetlb = backend == "hugetlb"
    with sweeping_on(backend, scratch) as vm:
        shmem, free = rss_shmem(vm.pid), meminfo("HugePages_Free")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        r = livedump("--pid", str(vm.pid), "-d", "31", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        assert rss_shmem(vm.pid) == shmem
        assert meminfo("HugePages_Free") == free
        assert_guest_data(ours, vm)
        begin, end = own_dump_of(vm, theirs, hugetlb)
        if hugetlb:
            assert read_phys(ours, begin, end - begin) == read_phys(theirs, begin, end - begin)
        else:
            assert first_difference(ours, theirs) is None
        assert_sweeps_on(vm)
