"""A real Linux guest for tests and benchmarks: Debian's kernel, a tiny initramfs.

``guest_files()`` builds (once, into a cache directory) a bootable kernel and
an initramfs holding a static busybox, ``/init`` (``guest/init.sh``), a
small static helper (``guest/toucher.c``) and the kernel's ``qemu_fw_cfg``
module (loaded at boot, so ``-device vmcoreinfo`` gets the guest's VMCOREINFO)
and ``pvpanic-mmio`` (loaded at boot, so ``-device pvpanic`` hears of a panic).
The guest needs no disk and no network; it is steered by switches on its
kernel command line and reports on its serial console:

* ``livedump.touch=MIB``: fill that many MiB of guest memory with non-zero
  data, held by a live process (``LIVEDUMP-TOUCH mib= seconds= mib_per_s=``);
* ``livedump.cache=MIB``: write that many MiB of files into ``/dev/shm``
  (tmpfs: page cache), about half compressible (``LIVEDUMP-CACHE mib= ...``);
* ``livedump.marker=N``: put N known strings in N pages of a live process and
  print each page's guest-physical address (``LIVEDUMP-MARKER gpa= text=``);
* ``livedump.kmsg=S``: log a few awkward messages (a tab, UTF-8, a control
  character, two lines in one), then ``LIVEDUMP-KMSG n=N`` every S seconds;
* ``livedump.panic=1``: crash the kernel once set up (the guest is booted with
  ``panic=0``, so it stays up, panicked).

``LinuxVM`` is ``integration.vm.VM`` booting that guest with its console in a
file; ``wait_for_console`` and ``parse_markers`` read that file.  KASLR is
left on: finding the kernel is the job of the tools under test.

Run ``python -m integration.linux_guest --help`` for a stand-alone check that
also reports boot and touch times.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .vm import VM

GUEST_SOURCES = Path(__file__).resolve().parent / "guest"
INIT_SCRIPT = GUEST_SOURCES / "init.sh"
HELPER_SOURCE = GUEST_SOURCES / "toucher.c"

# Bump when the way the initramfs is assembled changes, to rebuild caches.
INITRAMFS_FORMAT = 1

# Debian's meta-package; it depends on the concrete linux-image-<release>.
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# What /init and the helper rely on; it must be built into the kernel
# (``=y``), as the initramfs carries no modules.
REQUIRED_KERNEL_CONFIG = (
    "BLK_DEV_INITRD",       # boot from an initramfs at all
    "RD_GZIP",              # ... compressed with gzip
    "BINFMT_ELF",           # run busybox and the helper
    "BINFMT_SCRIPT",        # run /init, a #! script
    "SERIAL_8250",          # the PC serial port
    "SERIAL_8250_CONSOLE",  # ... as console=ttyS0
    "PROC_FS",
    "PROC_PAGE_MONITOR",    # /proc/self/pagemap
    "SYSFS",
    "DEVTMPFS",
    "TMPFS",                # /dev/shm
    "SHMEM",
    "MAGIC_SYSRQ",          # livedump.panic=1 via /proc/sysrq-trigger
    "CRASH_CORE",           # VMCOREINFO, and /sys/kernel/vmcoreinfo
    "KALLSYMS",             # /proc/kallsyms: where KASLR put _text
)

BASE_CMDLINE = "console=ttyS0 panic=0 quiet"

READY = "LIVEDUMP-GUEST-READY"
IDLE = "LIVEDUMP-GUEST-IDLE"
PANIC = "LIVEDUMP-GUEST-PANIC"
# Lines after which waiting on for anything else is pointless.
FAILURE = r"LIVEDUMP-GUEST-ERROR.*|Kernel panic - not syncing.*"

_MARKER_LINE = re.compile(r"^LIVEDUMP-MARKER gpa=(0x[0-9a-f]+) text=(\S+)\s*$", re.M)
_VMCOREINFO_LINE = re.compile(r"^LIVEDUMP-VMCOREINFO (?:0x)?([0-9a-f]+) ([0-9a-f]+)\s*$", re.M)
_KERNEL_TEXT_LINE = re.compile(r"^LIVEDUMP-KERNEL-TEXT ([0-9a-f]+)\s*$", re.M)
# x86_64: where _text is linked, and so KASLR's offset is counted from.
START_KERNEL = 0xFFFFFFFF81000000
_KERNEL_OFFSET_LINE = re.compile(r"Kernel Offset: (0x[0-9a-f]+) from 0x[0-9a-f]+")
_TOUCH_LINE = re.compile(
    r"^LIVEDUMP-TOUCH mib=(\d+) seconds=([\d.]+) mib_per_s=([\d.]+)\s*$", re.M)


# --------------------------------------------------------------------------
# Building the kernel and initramfs (cached)
# --------------------------------------------------------------------------

def cache_dir(cache: Path | None = None) -> Path:
    """``cache``, else ``$LIVEDUMP_GUEST_CACHE``, else ``~/.cache/livedump/linux-guest``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("LIVEDUMP_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "livedump" / "linux-guest"


def guest_files(cache: Path | None = None) -> tuple[Path, Path]:
    """``(vmlinuz, initramfs)``, built into the cache on first use, then reused.

    The kernel is kept until the cache is deleted; the initramfs is rebuilt
    whenever ``guest/init.sh`` or ``guest/toucher.c`` change.
    """
    root = cache_dir(cache)
    return _kernel_dir(root) / "vmlinuz", _initramfs(root)


def kernel_release(cache: Path | None = None) -> str:
    """The guest kernel's release string, e.g. ``6.1.0-56-amd64``."""
    return (_kernel_dir(cache_dir(cache)) / "kernel-release").read_text().strip()


def kernel_config(cache: Path | None = None) -> Path:
    """The guest kernel's ``config-<release>`` (Debian's System.map is a stub)."""
    return _kernel_dir(cache_dir(cache)) / "config"


class _Locked:
    """An exclusive lock on ``root/.lock``, so concurrent builders wait for each other."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.file = open(root / ".lock", "w")

    def __enter__(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _run(args: list[str], cwd: Path | None = None) -> str:
    """Run a command; its stdout, or an error that includes its stderr."""
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _apt_get_download(package: str, into: Path) -> Path:
    """``apt-get download`` one package into ``into``; ``apt-get update`` and
    retry once if that fails (stale or missing package lists)."""
    try:
        _run(["apt-get", "download", package], cwd=into)
    except RuntimeError:
        _run(["apt-get", "update"])
        _run(["apt-get", "download", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download {package} left {debs} in {into}")
    return debs[0]


def _kernel_package() -> str:
    """The concrete ``linux-image-<release>`` the meta-package depends on."""
    def resolve() -> str | None:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
        m = re.search(r"^\s*Depends:\s*(linux-image-\d\S*)\s*$", out, re.M)
        return m.group(1) if m else None

    try:
        name = resolve()
    except RuntimeError:
        name = None
    if name is None:
        _run(["apt-get", "update"])
        name = resolve()
    if name is None:
        raise RuntimeError(f"cannot tell which kernel {KERNEL_META_PACKAGE} depends on")
    return name


def _check_kernel_config(config: str, required: Iterable[str] = REQUIRED_KERNEL_CONFIG) -> None:
    """Fail unless every option in ``required`` is built in."""
    values = dict(re.findall(r"^CONFIG_(\w+)=(.*)$", config, re.M))
    missing = [f"CONFIG_{o}={values.get(o, 'n')}" for o in required
               if values.get(o) != "y"]
    if missing:
        raise RuntimeError(f"the guest kernel lacks built-in {', '.join(missing)}; "
                           "the initramfs has no modules")


def _kernel_dir(root: Path) -> Path:
    """``root/kernel`` with ``vmlinuz``, ``config`` and ``kernel-release``."""
    final = root / "kernel"
    if (final / "kernel-release").exists():
        return final
    with _Locked(root):
        if (final / "kernel-release").exists():  # built while we waited
            return final
        with tempfile.TemporaryDirectory(prefix=".build-kernel-", dir=root) as tmp:
            work = Path(tmp)
            package = _kernel_package()
            release = package.removeprefix("linux-image-")
            deb = _apt_get_download(package, work)
            # Only ./boot is needed; streaming the data tarball avoids writing
            # the 400 MB of modules that ``dpkg-deb -x`` would extract.
            staged = work / "kernel"
            staged.mkdir()
            _extract(deb, {f"./boot/vmlinuz-{release}": staged / "vmlinuz",
                           f"./boot/config-{release}": staged / "config"})
            _check_kernel_config((staged / "config").read_text())
            # Written last: its presence marks a complete directory.
            (staged / "kernel-release").write_text(release + "\n")
            if final.exists():  # incomplete, from an unknown past
                shutil.rmtree(final)
            staged.rename(final)
    return final


def _extract(deb: Path, wanted: dict[str, Path], any_of: bool = False) -> None:
    """Extract the members ``wanted`` names (``./path`` in the package) to the paths
    it gives; with ``any_of``, whichever of them the package has. Streaming the
    data tarball avoids writing what is not wanted (the 400 MB of modules that
    ``dpkg-deb -x`` would extract, say)."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as dpkg:
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(wanted[member.name], "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
    if dpkg.returncode != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    missing = [name for name, path in wanted.items() if not path.exists()]
    if missing and (not any_of or len(missing) == len(wanted)):
        raise RuntimeError(f"{deb.name} has no {' or '.join(missing)}")


def debug_vmlinux(cache: Path | None = None) -> Path:
    """The guest kernel's ``vmlinux`` with debug info, for crash and drgn: from
    Debian's ``linux-image-<release>-dbg`` (an 858 MB download, of which only
    vmlinux is kept, in ``<cache>/debug/``)."""
    root = cache_dir(cache)
    release = kernel_release(cache)
    final = root / "debug" / f"vmlinux-{release}"
    if final.exists():
        return final
    with _Locked(root):
        if final.exists():
            return final
        final.parent.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-debug-", dir=root) as tmp:
            work = Path(tmp)
            deb = _apt_get_download(f"linux-image-{release}-dbg", work)
            _extract(deb, {f"./usr/lib/debug/boot/vmlinux-{release}": work / "vmlinux"})
            (work / "vmlinux").rename(final)
    return final


def _fw_cfg_module(root: Path) -> Path:
    """``root/kernel/qemu_fw_cfg.ko``, the module through which the guest hands its
    VMCOREINFO to QEMU's vmcoreinfo device."""
    return _kernel_module(root, "drivers/firmware/qemu_fw_cfg.ko")


def _pvpanic_modules(root: Path) -> tuple[Path, Path]:
    """``root/kernel/pvpanic.ko`` and ``pvpanic-mmio.ko``, the driver of QEMU's
    ``-device pvpanic`` (ACPI's QEMU0001), through which a panicking guest tells QEMU."""
    return (_kernel_module(root, "drivers/misc/pvpanic/pvpanic.ko"),
            _kernel_module(root, "drivers/misc/pvpanic/pvpanic-mmio.ko"))


def _kernel_module(root: Path, path: str) -> Path:
    """``root/kernel/NAME.ko``, the kernel's module at ``path`` (under its release's
    ``kernel/``). The kernel's package is fetched again for it: the kernel
    directory was first built with ./boot only."""
    kernel = _kernel_dir(root)
    name = Path(path).name
    final = kernel / name
    if final.exists():
        return final
    with _Locked(root):
        if final.exists():
            return final
        release = kernel_release(root)
        with tempfile.TemporaryDirectory(prefix=".build-module-", dir=root) as tmp:
            work = Path(tmp)
            deb = _apt_get_download(f"linux-image-{release}", work)
            # Debian 12 ships modules under /lib, uncompressed; Debian 13 under
            # /usr/lib, compressed with xz (which busybox's insmod cannot take).
            wanted = {f"./{prefix}lib/modules/{release}/kernel/{path}{suffix}":
                      work / f"{i}{suffix}"
                      for i, prefix in enumerate(("", "usr/")) for suffix in ("", ".xz")}
            _extract(deb, wanted, any_of=True)
            [got] = [p for p in wanted.values() if p.exists()]
            data = got.read_bytes()
            (work / name).write_bytes(lzma.decompress(data) if got.suffix == ".xz" else data)
            (work / name).rename(final)
    return final


def _initramfs(root: Path) -> Path:
    """``root/initramfs-<hash>.cpio.gz``, keyed by the sources that go into it."""
    module, pvpanic = _fw_cfg_module(root), _pvpanic_modules(root)
    digest = hashlib.sha256(f"format {INITRAMFS_FORMAT}\n".encode())
    for source in (INIT_SCRIPT, HELPER_SOURCE, module, *pvpanic):
        digest.update(source.read_bytes())
    final = root / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if final.exists():
        return final
    with _Locked(root):
        if final.exists():
            return final
        with tempfile.TemporaryDirectory(prefix=".build-initramfs-", dir=root) as tmp:
            work = Path(tmp)
            deb = _apt_get_download(BUSYBOX_PACKAGE, work)
            _run(["dpkg-deb", "-x", str(deb), str(work / "busybox")])
            busybox = work / "busybox" / "bin" / "busybox"
            helper = work / "livedump-guest"
            _run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(helper),
                  str(HELPER_SOURCE)])
            staged = work / "initramfs.cpio.gz"
            staged.write_bytes(_build_cpio(busybox, helper, module, pvpanic))
            os.replace(staged, final)
        # Older initramfs builds (from older sources) are of no further use.
        for old in root.glob("initramfs-*.cpio.gz"):
            if old != final:
                old.unlink(missing_ok=True)
    return final


class _Cpio:
    """A writer of "newc" cpio archives, as the kernel unpacks for an initramfs."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        self.inode += 1
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0]  # ino mode uid gid nlink mtime size dev rdev namesize check
        self.out.write(b"070701" + b"".join(b"%08x" % f for f in fields) + encoded)
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _build_cpio(busybox: Path, helper: Path, module: Path,
                pvpanic: tuple[Path, Path]) -> bytes:
    """The gzipped initramfs: /init, busybox with its applet links, the helper,
    the fw_cfg module."""
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
              "root", "lib"):
        cpio.directory(d)
    # The kernel opens /dev/console for init's stdio before /init mounts devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("bin/livedump-guest", helper.read_bytes(), 0o755)
    cpio.file("lib/qemu_fw_cfg.ko", module.read_bytes())
    for ko in pvpanic:
        cpio.file(f"lib/{ko.name}", ko.read_bytes())
    # Busybox is static, so the host can ask it where its applets belong.
    applets = _run([str(busybox), "--list-full"]).split()
    for path in sorted(set(applets) - {"bin/busybox"}):
        cpio.symlink(path, "/bin/busybox")
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


# --------------------------------------------------------------------------
# Booting it
# --------------------------------------------------------------------------

def kernel_cmdline(touch_mib: int = 0, markers: int = 0, panic: bool = False,
                   extra: Iterable[str] = ()) -> str:
    """The guest's kernel command line; KASLR stays on."""
    words = [BASE_CMDLINE]
    if touch_mib:
        words.append(f"livedump.touch={touch_mib}")
    if markers:
        words.append(f"livedump.marker={markers}")
    if panic:
        words.append("livedump.panic=1")
    words += extra
    return " ".join(words)


def linux_args(console: Path, touch_mib: int = 0, markers: int = 0, panic: bool = False,
               cmdline_extra: Iterable[str] = (), smp: int = 1,
               cache: Path | None = None) -> list[str]:
    """QEMU arguments (for ``VM.extra``) that boot the guest, console to ``console``.

    The CPU model is left at QEMU's default (qemu64 under TCG), which lacks
    LA57: the Debian kernel supports 5-level paging and would use it on
    ``-cpu max``.  ``-no-reboot`` makes a guest reset (e.g. a triple fault)
    end QEMU instead of silently booting again.
    """
    vmlinuz, initramfs = guest_files(cache)
    return [
        "-kernel", str(vmlinuz), "-initrd", str(initramfs),
        "-append", kernel_cmdline(touch_mib, markers, panic, cmdline_extra),
        "-serial", f"file:{console}", "-smp", str(smp), "-no-reboot",
    ]


@dataclass(frozen=True)
class GuestMarker:
    """A string the guest placed at guest-physical address ``gpa``."""

    gpa: int
    text: str


@dataclass(frozen=True)
class TouchReport:
    """How long the guest took to fill ``mib`` MiB with non-zero data."""

    mib: int
    seconds: float
    mib_per_s: float


def console_text(path: Path) -> str:
    """The console output so far, with the serial line's CRs dropped."""
    try:
        return path.read_bytes().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def wait_for_console(path: Path, pattern: str, timeout: float,
                     process: subprocess.Popen | None = None,
                     fail: str | None = FAILURE) -> str:
    """Wait until a line of the console log ``path`` matches the regex
    ``pattern``; return that line.

    Raises RuntimeError early if a line matches ``fail`` first (a guest error
    or a kernel panic; pass None to wait through those) or if ``process`` (the
    QEMU) exits, and TimeoutError after ``timeout`` seconds.
    """
    wanted = re.compile(pattern)
    failed = re.compile(fail) if fail else None
    deadline = time.monotonic() + timeout
    while True:
        # Check for exit before reading, so that the last output is seen.
        exited = process is not None and process.poll() is not None
        text = console_text(path)
        for line in text.splitlines():
            if wanted.search(line):
                return line
        for line in text.splitlines():
            if failed and failed.search(line):
                raise RuntimeError(f"guest failed: {line}\n{_tail(text)}")
        if exited:
            raise RuntimeError(f"QEMU exited ({process.returncode}) before "
                               f"{pattern!r}\n{_tail(text)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} on the console after {timeout:g}s\n"
                               f"{_tail(text)}")
        time.sleep(0.05)


def _tail(text: str, lines: int = 40) -> str:
    return "console tail:\n" + "\n".join(text.splitlines()[-lines:])


def parse_markers(text: str) -> list[GuestMarker]:
    """The ``LIVEDUMP-MARKER`` lines of console output ``text``."""
    return [GuestMarker(int(gpa, 16), t) for gpa, t in _MARKER_LINE.findall(text)]


@dataclass(frozen=True)
class KernelFacts:
    """What the guest says of its kernel: where its VMCOREINFO note is
    (``/sys/kernel/vmcoreinfo``) and how far KASLR moved it."""

    vmcoreinfo_paddr: int
    vmcoreinfo_size: int
    kaslr_offset: int


def parse_kernel_facts(text: str) -> KernelFacts | None:
    """The ``LIVEDUMP-VMCOREINFO`` and ``LIVEDUMP-KERNEL-TEXT`` lines of ``text``;
    after a reboot, the last ones (the running kernel's)."""
    notes, kernels = _VMCOREINFO_LINE.findall(text), _KERNEL_TEXT_LINE.findall(text)
    if not (notes and kernels):
        return None
    (paddr, size), address = notes[-1], kernels[-1]
    return KernelFacts(int(paddr, 16), int(size, 16), int(address, 16) - START_KERNEL)


def parse_kernel_offset(text: str) -> int | None:
    """The KASLR offset a panic message reports ("Kernel Offset: 0x... from
    0xffffffff81000000"), e.g. after ``livedump.panic=1``; None if absent."""
    m = _KERNEL_OFFSET_LINE.search(text)
    return int(m.group(1), 16) if m else None


# A TCG Linux guest on a loaded host (nested KVM whose vCPUs are starved) may
# keep its monitor busy for long. Its tests check what is dumped or read, not
# how fast the monitor answers, so they give livedump (and the harness) limits
# that only a hung QEMU reaches; the stall limit outlasts the longest wait for
# the monitor.
SLOW_GUEST_TIMEOUTS = ("--qmp-timeout", "120", "--stall-timeout", "300")
SLOW_GUEST_COMMAND_TIMEOUT = 300.0


def livedump_args(vm: VM) -> tuple[str, ...]:
    """The guest ``vm``, for livedump, with ``SLOW_GUEST_TIMEOUTS``."""
    return ("--pid", str(vm.pid), *SLOW_GUEST_TIMEOUTS)


def parse_touch(text: str) -> TouchReport | None:
    """The ``LIVEDUMP-TOUCH`` report in console output ``text``, if any."""
    m = _TOUCH_LINE.search(text)
    return TouchReport(int(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None


@dataclass
class LinuxVM(VM):
    """``VM`` booting the Linux guest; its serial console goes to ``self.console``.

    ``guest_markers`` is the number of marker pages (``VM.markers`` are bytes
    QEMU loads before power-on, which the booting kernel may overwrite).
    """

    machine: str = "q35"
    memory: str = "2G"
    touch_mib: int = 0
    guest_markers: int = 0
    panic: bool = False
    cmdline_extra: list[str] = field(default_factory=list)
    smp: int = 1
    cache: Path | None = None
    command_timeout: float = SLOW_GUEST_COMMAND_TIMEOUT

    def livedump_args(self) -> tuple[str, ...]:
        """This guest, for livedump (``livedump_args``)."""
        return livedump_args(self)

    def __enter__(self) -> LinuxVM:
        # Build (or find) the guest files before starting the clock.
        guest_files(self.cache)
        self.console_dir = Path(tempfile.mkdtemp(prefix="livedump-guest-"))
        self.console = self.console_dir / "console.log"
        args = linux_args(self.console, self.touch_mib, self.guest_markers, self.panic,
                          self.cmdline_extra, self.smp, self.cache)
        own_extra = self.extra
        self.extra = [*args, *own_extra]
        self.started = time.monotonic()
        try:
            super().__enter__()
        except BaseException:
            shutil.rmtree(self.console_dir, ignore_errors=True)
            raise
        finally:
            self.extra = own_extra
        return self

    def wait_for(self, pattern: str, timeout: float = 300,
                 fail: str | None = FAILURE) -> str:
        """``wait_for_console`` on this VM's console; the matching line."""
        return wait_for_console(self.console, pattern, timeout, self.process, fail)

    def wait_ready(self, timeout: float = 300) -> float:
        """Wait for ``LIVEDUMP-GUEST-READY``; seconds since QEMU was started."""
        self.wait_for(f"^{READY}\\b", timeout)
        return time.monotonic() - self.started

    def wait_idle(self, timeout: float = 600) -> float:
        """Wait until the guest has done all it was asked; seconds since start."""
        self.wait_for(f"^{IDLE}\\b", timeout)
        return time.monotonic() - self.started

    def console_text(self) -> str:
        return console_text(self.console)

    def guest_marker_list(self) -> list[GuestMarker]:
        """The markers the guest reported so far."""
        return parse_markers(self.console_text())

    def touch_report(self) -> TouchReport | None:
        return parse_touch(self.console_text())

    def kernel_facts(self) -> KernelFacts | None:
        return parse_kernel_facts(self.console_text())

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            shutil.rmtree(self.console_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# Stand-alone check: python -m integration.linux_guest
# --------------------------------------------------------------------------

def check_markers_in_dump(vmcore: Path, markers: list[GuestMarker]) -> None:
    """Assert that each marker's text is at its guest-physical address in ``vmcore``."""
    from .vmcore import read_phys

    for m in markers:
        found = read_phys(vmcore, m.gpa, len(m.text))
        if found != m.text.encode():
            raise AssertionError(f"at {m.gpa:#x}: {found!r}, not {m.text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Boot the Linux test guest under TCG; report timings; optionally "
                    "check its markers in QEMU's own dump.")
    parser.add_argument("--machine", default="q35")
    parser.add_argument("--memory", default="4G")
    parser.add_argument("--touch", type=int, default=1024, metavar="MIB")
    parser.add_argument("--markers", type=int, default=4)
    parser.add_argument("--smp", type=int, default=1)
    parser.add_argument("--dump", action="store_true",
                        help="pause, dump-guest-memory to /dev/shm, check the markers")
    args = parser.parse_args(argv)

    t = time.monotonic()
    vmlinuz, initramfs = guest_files()
    print(f"guest files ({time.monotonic() - t:.1f}s): {vmlinuz} {initramfs}, "
          f"kernel {kernel_release()}")
    with LinuxVM(machine=args.machine, memory=args.memory, touch_mib=args.touch,
                 guest_markers=args.markers, smp=args.smp) as vm:
        print(f"ready after {vm.wait_ready():.1f}s")
        print(f"idle after {vm.wait_idle():.1f}s")
        print(vm.touch_report())
        markers = vm.guest_marker_list()
        for m in markers:
            print(f"  {m.gpa:#x} {m.text}")
        if args.dump:
            vm.command("stop")
            scratch = Path(tempfile.mkdtemp(prefix="livedump-guest-dump-", dir="/dev/shm"))
            try:
                t = time.monotonic()
                vm.own_dump(scratch / "qemu.vmcore")
                print(f"dump-guest-memory took {time.monotonic() - t:.1f}s")
                check_markers_in_dump(scratch / "qemu.vmcore", markers)
                print(f"all {len(markers)} markers found at their addresses")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        print(vm.console_text(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
