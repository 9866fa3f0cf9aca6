"""Dumps onto FAT filesystems: no hard links, and a mode their mount options decide.

Each runs on a real image made by mkfs (dosfstools, exfatprogs), loop-mounted
by the kernel's driver, and for exFAT also by the FUSE one (exfat-fuse, for
kernels without it); each combination skips, saying why, where it cannot
mount. The kernel's vfat and exfat have RENAME_NOREPLACE; exfat-fuse has
neither that nor links, so both ways of putting a file in place without
clobbering are met for real. (fusefat is no stand-in for vfat: it refuses
truncates and writes past the end of a file.)
"""

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import livedump
from .counting import assert_counts
from .vm import COUNTING_PC, VM, Marker

MARKER = b"livedump-on-fat-" + os.urandom(8).hex().encode()
FUSE = {"exfat": "mount.exfat-fuse"}
MKFS = {"vfat": "mkfs.vfat", "exfat": "mkfs.exfat"}


def _kernel_has(kind: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == kind for line in f if line.strip())


@contextlib.contextmanager
def fat(kind: str, driver: str, umask: str, base: Path) -> Iterator[Path]:
    """A fresh ``kind`` filesystem mounted with ``umask`` by ``driver``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem image needs root")
    if shutil.which(MKFS[kind]) is None:
        pytest.skip(f"no {MKFS[kind]} (integration/setup --test installs it)")
    if driver == "kernel" and not _kernel_has(kind):
        pytest.skip(f"this kernel has no {kind} driver (/proc/filesystems)")
    if driver == "fuse" and (shutil.which(FUSE[kind]) is None
                             or not os.path.exists("/dev/fuse")):
        pytest.skip(f"no {FUSE[kind]} or no /dev/fuse")
    image, mountpoint = base / f"{kind}.img", base / f"{kind}-mnt"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(160 << 20)
    subprocess.run([MKFS[kind], str(image)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                          text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        if driver == "kernel":
            mount = ["mount", "-t", kind, "-o", f"umask={umask}", device, str(mountpoint)]
        else:
            mount = [FUSE[kind], "-o", f"umask={umask}", device, str(mountpoint)]
        r = subprocess.run(mount, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount {kind} with {driver}: {r.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


FILESYSTEMS = [pytest.param("vfat", "kernel", id="vfat-kernel"),
               pytest.param("exfat", "kernel", id="exfat-kernel"),
               pytest.param("exfat", "fuse", id="exfat-fuse")]


@pytest.fixture(scope="module")
def vm() -> Iterator[VM]:
    with VM(memory="32M", platform=COUNTING_PC, markers=[Marker(0x10_0000, MARKER)]) as vm:
        yield vm


def stops(vm: VM) -> int:
    return vm.events().count("STOP")


@pytest.mark.parametrize("kind, driver", FILESYSTEMS)
def test_private_mount_dumps_and_never_clobbers(vm: VM, scratch: Path, kind: str,
                                                driver: str) -> None:
    with fat(kind, driver, "077", scratch) as mnt:
        out = mnt / "x.vmcore"
        r = livedump("--pid", str(vm.pid), str(out))
        assert r.returncode == 0, r.stderr
        assert b"readable by others" not in r.stderr
        data = out.read_bytes()
        assert data.startswith(b"\x7fELF") and MARKER in data
        assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0  # 0700 or 0600: the owner's
        assert os.listdir(mnt) == ["x.vmcore"]

        r = livedump("--pid", str(vm.pid), str(out))
        assert r.returncode == 7
        assert r.stderr == f"livedump: {out} exists (use --force to replace it)\n".encode()
        assert out.read_bytes() == data
        out.write_bytes(b"old")
        r = livedump("--pid", str(vm.pid), "--force", "--quiet", str(out))
        assert r.returncode == 0, r.stderr
        assert MARKER in out.read_bytes()
        assert os.listdir(mnt) == ["x.vmcore"]
        assert_counts(vm)


@pytest.mark.parametrize("kind, driver", FILESYSTEMS)
def test_a_file_appearing_during_the_dump_is_not_clobbered(scratch: Path, kind: str,
                                                           driver: str) -> None:
    from livedump.transfer.output import Output, Placement

    with fat(kind, driver, "077", scratch) as mnt:
        path = mnt / "a.vmcore"
        with Output(str(path)) as out:
            # The kernel's drivers rename without replacing; FUSE ones can only claim.
            assert out.placement is (Placement.RENAME if driver == "kernel" else
                                     Placement.CLAIM)
            out.write(b"dump")
            path.write_bytes(b"raced")
            with pytest.raises(Exception, match="appeared during the dump"):
                out.commit()
        assert path.read_bytes() == b"raced"
        assert os.listdir(mnt) == ["a.vmcore"]
        # Case does not tell names apart on FAT: an "A.VMCORE" is the same file.
        upper = mnt / "B.VMCORE"
        with Output(str(mnt / "b.vmcore")) as out:
            out.write(b"dump")
            upper.write_bytes(b"raced")
            with pytest.raises(Exception, match="appeared during the dump"):
                out.commit()
        assert upper.read_bytes() == b"raced"


@pytest.mark.parametrize("kind, driver", FILESYSTEMS)
def test_a_mount_open_to_others_is_refused_unless_asked(vm: VM, scratch: Path, kind: str,
                                                        driver: str) -> None:
    with fat(kind, driver, "022", scratch) as mnt:
        out = mnt / "x.vmcore"
        stops(vm)  # Only what happens from here on.
        r = livedump("--pid", str(vm.pid), str(out))
        assert r.returncode == 2
        assert r.stderr == (
            f"livedump: {out} would have mode 0755 on the filesystem of {mnt}, which sets "
            "it (vfat, exfat: mount with umask=077): others could read guest memory; write "
            "it elsewhere, or give --allow-readable-by-others\n").encode()
        assert stops(vm) == 0  # Refused before the guest was paused.
        assert os.listdir(mnt) == []

        r = livedump("--pid", str(vm.pid), "--allow-readable-by-others", str(out))
        assert r.returncode == 0, r.stderr
        assert r.stderr.endswith(
            f"; {out} is readable by others (mode 0755, set by its filesystem)\n".encode())
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert MARKER in out.read_bytes()
        assert_counts(vm)


def test_force_replaces_no_device_node_fifo_or_directory(vm: VM, scratch: Path) -> None:
    device, fifo, directory = scratch / "null", scratch / "fifo", scratch / "dir"
    if os.geteuid() == 0:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
    os.mkfifo(fifo)
    directory.mkdir()
    stops(vm)
    for path, kind in ((device, "a character device"), (fifo, "a FIFO"),
                       (directory, "a directory")):
        if not path.exists():
            continue
        before = os.lstat(path)
        r = livedump("--pid", str(vm.pid), "--force", str(path))
        assert r.returncode == 7
        assert r.stderr == (f"livedump: {path} is {kind}: livedump replaces only regular "
                            "files and symlinks, even with --force\n").encode()
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_rdev) == (
            before.st_ino, before.st_mode, before.st_rdev)
    assert stops(vm) == 0
    assert sorted(os.listdir(scratch)) == sorted(p.name for p in (device, fifo, directory)
                                                 if p.exists())
    assert_counts(vm)
