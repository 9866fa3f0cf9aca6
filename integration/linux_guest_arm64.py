"""A real arm64 Linux guest for tests: Debian's arm64 kernel under
qemu-system-aarch64 (TCG, ``-M virt``), booted to a tiny initramfs.

``guest_files()`` fetches (once, into ``~/.cache/livedump/linux-guest-arm64``
or ``$LIVEDUMP_ARM64_GUEST_CACHE``) Debian's concrete ``linux-image-<release>``
for arm64 and ``busybox-static`` for arm64, through an apt of its own (its
own sources, lists and status under a temporary directory: the host's apt
state is left alone), and builds an initramfs of the x86_64 guest's
``/init`` (integration/guest/init.sh, so its switches work the same), started
by a preamble that makes busybox's applet links (the host cannot run an arm64
busybox to list them). The console is the PL011 (``ttyAMA0``) and is not
quiet: the tests take what it printed as the ground truth of the log.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .linux_guest import (
    FAILURE,
    IDLE,
    INIT_SCRIPT,
    SLOW_GUEST_COMMAND_TIMEOUT,
    _check_kernel_config,
    _Cpio,
    _extract,
    _Locked,
    console_text,
    livedump_args,
    wait_for_console,
)
from .qemus import private_apt
from .vm import VM, Platform

KERNEL_META_PACKAGE = "linux-image-arm64"
BUSYBOX_PACKAGE = "busybox-static"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Bump when the way the initramfs is assembled changes, to rebuild caches.
INITRAMFS_FORMAT = 2
# What the preamble and init.sh rely on, built in (the initramfs has one module).
REQUIRED_KERNEL_CONFIG = ("BLK_DEV_INITRD", "RD_GZIP", "BINFMT_ELF", "BINFMT_SCRIPT",
                          "SERIAL_AMBA_PL011", "SERIAL_AMBA_PL011_CONSOLE", "PROC_FS",
                          "SYSFS", "DEVTMPFS", "TMPFS", "SHMEM", "CRASH_CORE", "KALLSYMS")
BASE_CMDLINE = "console=ttyAMA0 panic=0"
PLATFORM = Platform("qemu-system-aarch64", "virt", ("-cpu", "cortex-a57"))
# /init: busybox's links first (it resolves its own path through /proc), then init.sh.
# ``livedump.panic_after=S`` crashes the kernel S seconds after boot, in the
# background: QMP's inject-nmi, which the x86 tests use, is not there on Arm.
PREAMBLE = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
for word in $(cat /proc/cmdline); do
    case "$word" in
        livedump.panic_after=*) (sleep "${word#*=}"; echo c >/proc/sysrq-trigger) & ;;
    esac
done
/bin/busybox umount /proc
exec /bin/sh /init.sh
"""


# init.sh looks for _text in /proc/kallsyms line by line in the shell, which takes
# minutes under TCG where _text comes late (arm64): the guest's copy lets grep look.
KALLSYMS_LOOP = """while read -r address _ name; do
    if [ "$name" = _text ]; then echo "LIVEDUMP-KERNEL-TEXT $address"; break; fi
done </proc/kallsyms
"""
KALLSYMS_GREP = """grep -m1 ' _text$' /proc/kallsyms | while read -r address _ _; do
    echo "LIVEDUMP-KERNEL-TEXT $address"
done
"""


def init_script() -> bytes:
    """init.sh as the arm64 guest runs it."""
    text = INIT_SCRIPT.read_text()
    if KALLSYMS_LOOP not in text:
        raise RuntimeError(f"{INIT_SCRIPT} no longer has the loop this guest replaces")
    return text.replace(KALLSYMS_LOOP, KALLSYMS_GREP).encode()


class FetchError(RuntimeError):
    """The arm64 packages could not be had: the tests that need them skip."""


def cache_dir(cache: Path | None = None) -> Path:
    if cache is not None:
        return Path(cache)
    env = os.environ.get("LIVEDUMP_ARM64_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "livedump" / "linux-guest-arm64"


def guest_files(cache: Path | None = None) -> tuple[Path, Path]:
    """``(vmlinuz, initramfs)``, fetched and built on first use; FetchError if the
    packages cannot be fetched."""
    root = cache_dir(cache)
    kernel = root / "kernel"
    with _Locked(root):
        if not (kernel / "kernel-release").exists():
            _fetch(root, kernel)
        return kernel / "vmlinuz", _initramfs(root, kernel)


def kernel_release(cache: Path | None = None) -> str:
    return (cache_dir(cache) / "kernel" / "kernel-release").read_text().strip()


def _fetch(root: Path, final: Path) -> None:
    """Fill ``final`` with vmlinuz, config, qemu_fw_cfg.ko, busybox and, written
    last, kernel-release."""
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        work = Path(tmp)
        apt = _private_apt(work)
        # (apt-get update succeeds, with warnings, where the mirror cannot be reached)
        depends = _apt(["apt-cache", *apt, "depends", KERNEL_META_PACKAGE],
                       f"apt-cache depends {KERNEL_META_PACKAGE} (arm64)")
        m = re.search(r"^\s*Depends:\s*(linux-image-\d\S*)\s*$", depends, re.M)
        if m is None:
            raise FetchError(f"cannot tell which kernel {KERNEL_META_PACKAGE} (arm64) "
                             f"depends on:\n{depends}")
        package, release = m[1], m[1].removeprefix("linux-image-")
        debs = work / "debs"
        debs.mkdir()
        _apt(["apt-get", "-q", *apt, "download", package, BUSYBOX_PACKAGE],
             f"apt-get download {package} {BUSYBOX_PACKAGE} (arm64)", cwd=debs)
        [kernel_deb] = debs.glob(f"{package}_*.deb")
        [busybox_deb] = debs.glob(f"{BUSYBOX_PACKAGE}_*.deb")
        staged = work / "kernel"
        staged.mkdir()
        _extract(kernel_deb, {
            f"./boot/vmlinuz-{release}": staged / "vmlinuz",
            f"./boot/config-{release}": staged / "config",
            f"./lib/modules/{release}/kernel/drivers/firmware/qemu_fw_cfg.ko":
                staged / "qemu_fw_cfg.ko"})
        _check_kernel_config((staged / "config").read_text(), REQUIRED_KERNEL_CONFIG)
        _extract(busybox_deb, {"./bin/busybox": staged / "busybox"})
        (staged / "kernel-release").write_text(release + "\n")
        if final.exists():  # incomplete, from an unknown past
            shutil.rmtree(final)
        staged.rename(final)


def _private_apt(work: Path) -> list[str]:
    """apt options for an apt of its own in ``work``, for arm64, on the mirrors and
    suites the host's sources name for main; its lists updated."""
    targets = _apt(["apt-get", "indextargets", "--format",
                    "$(REPO_URI) $(RELEASE) $(COMPONENT)", "Created-By: Packages"],
                   "apt-get indextargets")
    signed = f" signed-by={KEYRING}" if KEYRING.exists() else ""
    lines = sorted({f"deb [arch=arm64{signed}] {uri} {release} main\n"
                    for uri, release, component in (t.split() for t in targets.splitlines())
                    if component == "main"})
    if not lines:
        raise FetchError("the host's apt sources name no Debian mirror for main")
    apt = ["-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64",
           *private_apt(work, "".join(lines))]
    _apt(["apt-get", "-q", *apt, "update"], "apt-get update (arm64)")
    return apt


def _apt(args: list[str], what: str, cwd: Path | None = None) -> str:
    """Run an apt command; its stdout, or FetchError saying ``what`` failed and why."""
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FetchError(f"{what} failed: {r.stderr.strip()}")
    return r.stdout


def _initramfs(root: Path, kernel: Path) -> Path:
    """``root/initramfs-<hash>.cpio.gz``, keyed by what goes into it."""
    digest = hashlib.sha256(f"format {INITRAMFS_FORMAT}\n".encode() + PREAMBLE
                            + init_script())
    for source in (kernel / "busybox", kernel / "qemu_fw_cfg.ko"):
        digest.update(source.read_bytes())
    final = root / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if final.exists():
        return final
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
              "root", "lib"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    # The preamble's background job opens it before init.sh mounts devtmpfs.
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", PREAMBLE, 0o755)
    cpio.file("init.sh", init_script(), 0o755)
    cpio.file("bin/busybox", (kernel / "busybox").read_bytes(), 0o755)
    cpio.file("lib/qemu_fw_cfg.ko", (kernel / "qemu_fw_cfg.ko").read_bytes())
    staged = root / f".{final.name}.tmp"
    staged.write_bytes(gzip.compress(cpio.finish(), compresslevel=9, mtime=0))
    os.replace(staged, final)
    for old in root.glob("initramfs-*.cpio.gz"):
        if old != final:
            old.unlink(missing_ok=True)
    return final


@dataclass
class Arm64LinuxVM(VM):
    """``VM`` booting the arm64 guest on ``-M virt``; its console in ``self.console``."""

    memory: str = "512M"
    platform: Platform = PLATFORM
    cmdline_extra: list[str] = field(default_factory=list)
    cache: Path | None = None
    command_timeout: float = SLOW_GUEST_COMMAND_TIMEOUT

    def livedump_args(self) -> tuple[str, ...]:
        """This guest, for livedump (``livedump_args``)."""
        return livedump_args(self)

    def __enter__(self) -> Arm64LinuxVM:
        vmlinuz, initramfs = guest_files(self.cache)
        self.console_dir = Path(tempfile.mkdtemp(prefix="livedump-arm64-guest-"))
        self.console = self.console_dir / "console.log"
        own_extra = self.extra
        self.extra = ["-kernel", str(vmlinuz), "-initrd", str(initramfs),
                      "-append", " ".join([BASE_CMDLINE, *self.cmdline_extra]),
                      "-serial", f"file:{self.console}", "-no-reboot", *own_extra]
        self.started = time.monotonic()
        try:
            super().__enter__()
        except BaseException:
            shutil.rmtree(self.console_dir, ignore_errors=True)
            raise
        finally:
            self.extra = own_extra
        return self

    def wait_idle(self, timeout: float = 600) -> float:
        """Wait until the guest has done all it was asked; seconds since start."""
        wait_for_console(self.console, f"^{IDLE}\\b", timeout, self.process, FAILURE)
        return time.monotonic() - self.started

    def console_text(self) -> str:
        return console_text(self.console)

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            shutil.rmtree(self.console_dir, ignore_errors=True)


def fetchable() -> str | None:
    """Why the arm64 guest cannot be had here, or None."""
    if shutil.which("qemu-system-aarch64") is None:
        return "no qemu-system-aarch64"
    try:
        guest_files()
    except (FetchError, subprocess.SubprocessError, OSError) as e:
        return f"the arm64 guest's packages cannot be fetched: {e}"
    return None
