"""--format kdump against makedumpfile, on one paused Linux guest (slow: TCG).

The differential: livedump's kdump file of the paused guest keeps exactly the
pages that Debian's makedumpfile keeps from livedump's own ELF vmcore of the
same guest, at the same dump level, each byte for byte. The guest holds user
memory (its toucher), page cache (the initramfs's files) and free memory.
The readers (crash, drgn, makedumpfile --dump-dmesg) are opt-in
(``-m analysis``): they need the guest kernel's debug info.
"""

import json
import subprocess
import sys

import pytest

from livedump.vmcore.kdump import COMPRESSIONS
from tests.kdump_file import read, unflatten

from .conftest import livedump
from .linux_guest import LinuxVM, kernel_release
from .test_analysis import crash, drgn, vmlinux  # noqa: F401 (a fixture)
from .vmcore import loads

pytestmark = [pytest.mark.qemu, pytest.mark.linux]

# Debian's makedumpfile 1.7.2 is built with zlib and lzo only.
MAKEDUMPFILE_READS = ("zlib", "lzo", "none")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """The paused guest, its ELF vmcore by livedump, and a directory for the rest."""
    where = tmp_path_factory.mktemp("kdump")
    with LinuxVM(machine="q35", memory="512M", touch_mib=32) as vm:
        vm.wait_ready(timeout=300)
        vm.wait_idle(timeout=300)
        vm.command("stop")
        elf = where / "livedump.elf"
        r = livedump(*vm.livedump_args(), str(elf))
        assert r.returncode == 0, r.stderr
        yield vm, where, elf


def kdump(vm, path, *args: str) -> dict:
    r = livedump(*vm.livedump_args(), "--format", "kdump", "--json", *args, str(path))
    assert r.returncode == 0, r.stderr
    assert b"warning" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def makedumpfile(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["makedumpfile", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.parametrize("level", [31, 1, 16, 17])
def test_keeps_the_pages_makedumpfile_keeps_byte_for_byte(guest, level):
    vm, where, elf = guest
    ours, theirs = where / f"livedump.d{level}", where / f"makedumpfile.d{level}"
    report = kdump(vm, ours, "-d", str(level))["kdump"]
    makedumpfile("-c", "-d", str(level), str(elf), str(theirs))
    a, b = read(ours.read_bytes()), read(theirs.read_bytes())
    assert a.max_mapnr == b.max_mapnr
    assert a.ram == b.ram
    kept = a.pfns(a.dumpable)
    assert kept == b.pfns(b.dumpable)
    assert report["kept_pages"] == len(kept)
    # What lies past the kernel's memory (VGA RAM, firmware) counts as left out too.
    assert report["ram_pages"] > len(a.pfns(a.ram))
    assert sum(report["excluded_pages"].values()) == report["ram_pages"] - len(kept)
    for pfn in kept:
        assert a.page_at(pfn) == b.page_at(pfn), pfn
    if level & 16:  # most of an idle guest is free
        assert report["excluded_pages"]["free"] > len(kept)
    if level & 8:  # the toucher's 32 MiB
        assert report["excluded_pages"]["user"] >= 32 << 8
    if level & 1:
        assert report["zero_pages"] > 0 and a.dump_level == level


def elf_pages(path) -> dict[int, bytes]:
    """Every page an ELF vmcore's PT_LOADs hold in the file, by pfn."""
    pages = {}
    with open(path, "rb") as f:
        for load in loads(path):
            f.seek(load.offset)
            data = f.read(load.filesz)
            for at in range(0, load.filesz - load.filesz % 4096, 4096):
                pages[(load.paddr + at) // 4096] = data[at:at + 4096]
    return pages


@pytest.mark.parametrize("level", [31, 16])
def test_elf_holds_the_pages_makedumpfile_keeps(guest, level):
    # The pages of makedumpfile's kdump file at the same level. (Its -E output
    # fills runs of under 256 excluded pages with zeros rather than split its
    # PT_LOADs, and keeps some free blocks its kdump output leaves out.)
    vm, where, elf = guest
    ours, theirs = where / f"livedump.elf.d{level}", where / f"makedumpfile.kdump.d{level}"
    r = livedump(*vm.livedump_args(), "--json", "-d", str(level), str(ours))
    assert r.returncode == 0 and b"warning" not in r.stderr, r.stderr
    left = json.loads(r.stdout)["pages"]["excluded_pages"]
    makedumpfile("-c", "-d", str(level), str(elf), str(theirs))
    a, b = elf_pages(ours), read(theirs.read_bytes())
    kept = b.pfns(b.dumpable)
    assert sorted(a) == kept  # zero pages too: holes in livedump's file
    assert all(a[p] == b.page_at(p) for p in kept)
    assert left["free"] > len(kept)


def test_flattened_stream_converts_back_with_makedumpfile(guest):
    vm, where, _ = guest
    stream, restored, file = where / "flat", where / "restored", where / "file"
    with open(stream, "wb") as f:
        r = livedump(*vm.livedump_args(), "--format", "kdump", "-d", "31", "-", stdout=f)
    assert r.returncode == 0, r.stderr
    kdump(vm, file, "-d", "31")
    with open(stream, "rb") as f:
        subprocess.run(["makedumpfile", "-R", str(restored)], stdin=f, check=True,
                       capture_output=True, timeout=300)
    assert restored.read_bytes() == unflatten(stream.read_bytes())
    a, b = read(restored.read_bytes()), read(file.read_bytes())
    assert a.dumpable == b.dumpable and a.vmcoreinfo == b.vmcoreinfo
    assert all(a.page_at(p) == b.page_at(p) for p in a.pfns(a.dumpable))


@pytest.mark.analysis
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_crash_drgn_and_makedumpfile_read_each_compression(guest, vmlinux, compression):  # noqa: F811
    vm, where, _ = guest
    path = where / f"livedump.{compression}"
    kdump(vm, path, "-d", "31", "--compress", compression)
    out = crash(vmlinux, path, "sys", "log", "bt -a", "kmem -i")
    assert kernel_release() in out["sys"]
    assert "Linux version" in out["log"]
    assert "PID: 0" in out["bt -a"]
    assert "TOTAL MEM" in out["kmem -i"]
    r = drgn(vmlinux, path)
    assert r.returncode == 0, r.stderr
    assert f"release {kernel_release()}" in r.stdout
    assert "task 1 init" in r.stdout or "task 1 " in r.stdout
    if compression in MAKEDUMPFILE_READS:
        dmesg = where / f"dmesg.{compression}"
        makedumpfile("--dump-dmesg", str(path), str(dmesg))
        assert "Linux version" in dmesg.read_text(errors="replace")


@pytest.mark.analysis
def test_drgn_reads_the_flattened_stream_as_it_is(guest, vmlinux):  # noqa: F811
    vm, where, _ = guest
    stream = where / "flat-drgn"
    with open(stream, "wb") as f:
        r = livedump(*vm.livedump_args(), "--format", "kdump", "-d", "31", "-", stdout=f)
    assert r.returncode == 0, r.stderr
    r2 = drgn(vmlinux, stream)
    assert r2.returncode == 0, r2.stderr
    assert f"release {kernel_release()}" in r2.stdout


def test_without_a_compression_library_nothing_is_touched(guest, tmp_path):
    vm, _, _ = guest
    # A Python that cannot import zstandard: refused before the VM is looked at.
    code = ("import sys; sys.modules['zstandard'] = None; from livedump.cli import main; "
            f"sys.exit(main(['--pid', '{vm.pid}', '--format', 'kdump', '{tmp_path / 'x'}']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "zstandard" in r.stderr and not (tmp_path / "x").exists()


def test_qemus_vmcoreinfo_serves_without_a_search(tmp_path):
    # With the vmcoreinfo device QEMU's notes carry VMCOREINFO: the level is decided
    # from it, and the sub-header points at it inside the notes.
    with LinuxVM(machine="q35", memory="512M", extra=["-device", "vmcoreinfo"]) as vm:
        vm.wait_idle(timeout=300)
        vm.command("stop")
        elf, ours, theirs = tmp_path / "elf", tmp_path / "ours", tmp_path / "theirs"
        assert livedump(*vm.livedump_args(), str(elf)).returncode == 0
        report = kdump(vm, ours, "-d", "31")
    assert report["vmcoreinfo"]["source"] == "qemu"
    assert report["kdump"]["excluded_pages"]["free"] > 0
    makedumpfile("-c", "-d", "31", str(elf), str(theirs))
    a, b = read(ours.read_bytes()), read(theirs.read_bytes())
    assert a.vmcoreinfo == b.vmcoreinfo and a.vmcoreinfo.startswith(b"OSRELEASE=")
    assert a.pfns(a.dumpable) == b.pfns(b.dumpable)


def rss_shmem(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("RssShmem:")).split()[1]) * 1024


def test_guest_on_shared_memory_keeps_what_makedumpfile_keeps_creating_no_page(tmp_path):
    # RAM in a memfd, as vhost-user setups have it: the VMCOREINFO search, the
    # struct page array and the copy read it from the file where QEMU has not
    # mapped it, so QEMU's shared memory stays as it was (it grew to all of
    # guest RAM), and the pages kept are makedumpfile's, byte for byte.
    extra = ["-object", "memory-backend-memfd,id=ram0,size=512M,share=on",
             "-machine", "memory-backend=ram0"]
    with LinuxVM(machine="q35", memory="512M", touch_mib=32, extra=extra) as vm:
        vm.wait_idle(timeout=300)
        vm.command("stop")
        shmem = rss_shmem(vm.pid)
        elf = tmp_path / "elf"
        assert livedump(*vm.livedump_args(), str(elf)).returncode == 0
        assert rss_shmem(vm.pid) == shmem
        for level in (31, 1):
            ours, theirs = tmp_path / f"ours.d{level}", tmp_path / f"theirs.d{level}"
            report = kdump(vm, ours, "-d", str(level))
            assert rss_shmem(vm.pid) == shmem, f"-d {level}"
            assert report["read_bytes"] < 256 << 20, f"-d {level}"
            makedumpfile("-c", "-d", str(level), str(elf), str(theirs))
            a, b = read(ours.read_bytes()), read(theirs.read_bytes())
            kept = a.pfns(a.dumpable)
            assert kept == b.pfns(b.dumpable), f"-d {level}"
            assert all(a.page_at(p) == b.page_at(p) for p in kept), f"-d {level}"
