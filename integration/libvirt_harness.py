"""A real libvirtd and transient libvirt domains, for the tests of ``--domain``.

:class:`Libvirtd` starts virtlogd and libvirtd (as Debian 12 runs them
without systemd) only if they are not running already, and stops only what
it started. :class:`Domain` creates a transient domain (``virsh create``)
with known bytes at known guest-physical addresses, and destroys it
whatever happens. The files QEMU must read (markers, a QEMU other than the
system's) go to a directory that libvirt's unprivileged QEMU user can read,
since root's home is closed to it: nothing in the system's configuration
changes.
"""

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .qemus import Qemu
from .vm import Marker

URI = "qemu:///system"
SOCKETS = {"virtlogd": "/run/libvirt/virtlogd-sock", "libvirtd": "/run/libvirt/libvirt-sock"}
PID_FILES = {"virtlogd": "/run/virtlogd.pid", "libvirtd": "/run/libvirtd.pid"}
CAPABILITIES_CACHE = "/var/cache/libvirt/qemu/capabilities"
# The first connection waits for libvirt to probe every QEMU on the host (about 40 s).
READY_TIMEOUT = 180


def virsh(*args: str, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def domstate(name: str) -> str:
    """``virsh domstate --reason``, e.g. ``running (booted)``."""
    return virsh("domstate", "--reason", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pid(daemon: str) -> int | None:
    try:
        pid = int(Path(PID_FILES[daemon]).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


class Libvirtd:
    """virtlogd + libvirtd for the duration of the block; started only if need be."""

    def __enter__(self) -> "Libvirtd":
        self.started: list[int] = []
        try:
            for daemon in ("virtlogd", "libvirtd"):
                if _pid(daemon) is None:
                    subprocess.run([daemon, "-d"], check=True, timeout=60)
                    self.started.append(self._wait_for_pid(daemon))
            self.pid = _pid("libvirtd")
            virsh("version", timeout=READY_TIMEOUT)  # Waits out the capabilities probe.
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _wait_for_pid(daemon: str) -> int:
        deadline = time.monotonic() + 30
        while (pid := _pid(daemon)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{daemon} did not start")
            time.sleep(0.05)
        return pid

    def alive(self) -> bool:
        """Whether the same libvirtd still runs and answers."""
        return self.pid is not None and _alive(self.pid) and _pid("libvirtd") == self.pid \
            and bool(virsh("uri", check=False))

    def __exit__(self, *exc: object) -> None:
        for pid in reversed(self.started):  # libvirtd first, then virtlogd.
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Domain:
    """A transient domain; use as a context manager so it is always destroyed."""

    files: Path  # A directory libvirt's QEMU user can read.
    markers: list[Marker] = field(default_factory=list)
    kind: str = "qemu"  # The domain type: qemu (TCG) or kvm.
    memory_mib: int = 512
    emulator: str = "/usr/bin/qemu-system-x86_64"
    running: bool = True  # False: defined only (shut off), not started.
    # A Linux guest to boot, (kernel, initramfs, command line), its serial
    # console into ``self.console``; None: the firmware only.
    linux: tuple[Path, Path, str] | None = None

    def __enter__(self) -> "Domain":
        self.name = f"livedump-test-{uuid.uuid4().hex[:8]}"
        self.console = self.files / f"{self.name}-console.log"
        args = []
        for i, m in enumerate(self.markers):
            path = self.files / f"{self.name}-marker{i}.bin"
            path.write_bytes(m.data)
            path.chmod(0o644)
            args += ["-device", f"loader,file={path},addr={m.gpa:#x},force-raw=on"]
        xml = self.files / f"{self.name}.xml"
        xml.write_text(self._xml(args))
        virsh("create" if self.running else "define", str(xml))
        return self

    def _xml(self, qemu_args: list[str]) -> str:
        args = "".join(f"<qemu:arg value={quoteattr(a)}/>" for a in qemu_args)
        return f"""\
<domain type='{self.kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{self.name}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{self._boot()}</os>
  <!-- ACPI on, as QEMU's default: without it libvirt 9.0 passes -no-acpi,
       which QEMU 10 no longer has. -->
  <features><acpi/></features>
  <devices>
    <emulator>{self.emulator}</emulator>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>{self._serial()}
  </devices>
  <qemu:commandline>{args}</qemu:commandline>
</domain>
"""

    def _boot(self) -> str:
        """The ``<os>`` elements that boot ``linux``, from copies libvirt's QEMU user
        can read."""
        if self.linux is None:
            return ""
        kernel, initramfs, cmdline = self.linux
        copies = []
        for source, suffix in ((kernel, "vmlinuz"), (initramfs, "initramfs")):
            copy = self.files / f"{self.name}-{suffix}"
            shutil.copyfile(source, copy)
            copy.chmod(0o644)
            copies.append(copy)
        return (f"<kernel>{copies[0]}</kernel><initrd>{copies[1]}</initrd>"
                f"<cmdline>{escape(cmdline)}</cmdline>")

    def _serial(self) -> str:
        if self.linux is None:
            return ""
        return (f"<serial type='file'><source path={quoteattr(str(self.console))}/>"
                "<target port='0'/></serial>")

    @property
    def pid(self) -> int:
        return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text())

    def log(self) -> str:
        """libvirt's log of this domain's QEMU (where it notes taints)."""
        return Path(f"/var/log/libvirt/qemu/{self.name}.log").read_text()

    def wait_for(self, state: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not domstate(self.name).startswith(state):
            assert time.monotonic() < deadline, f"domain never became {state}"
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.running:
            virsh("destroy", self.name, check=False)
        else:
            virsh("undefine", self.name, check=False)
        for path in self.files.glob(f"{self.name}*"):
            path.unlink()
        Path(f"/var/log/libvirt/qemu/{self.name}.log").unlink(missing_ok=True)


def readable_dir() -> Path:
    """A fresh directory that libvirt's QEMU user may read (root's home is closed to it)."""
    path = Path(tempfile.mkdtemp(prefix="livedump-libvirt-", dir="/var/tmp"))
    path.chmod(0o755)
    return path


def emulator(qemu: Qemu, where: Path) -> Path:
    """What a domain's ``<emulator>`` names to start ``qemu``, from ``where``.

    The system's QEMU is itself; another one is copied into ``where``, as
    libvirt's QEMU user cannot read root's home: a debug build with its data
    directory (it finds its firmware there), an unpacked QEMU with its tree,
    started by a script that does what :meth:`Qemu.command` does, in a user
    namespace, as that user may not make a mount namespace otherwise.
    """
    if qemu.root is None and not qemu.debug:
        return qemu.binary
    copy = where / f"qemu-{qemu.series}"
    if qemu.debug:  # bin/qemu-system-x86_64 and share/qemu
        shutil.copytree(qemu.binary.parent.parent, copy, symlinks=True)
        return copy / "bin" / qemu.binary.name
    shutil.copytree(qemu.root, copy / "root", symlinks=True)
    moved = Qemu(copy / "root" / qemu.binary.relative_to(qemu.root), copy / "root")
    script = copy / qemu.binary.name
    script.write_text(f'#!/bin/sh\nexec {shlex.join(moved.command(unprivileged=True))} "$@"\n')
    script.chmod(0o755)
    return script


def forget_emulator(binary: Path) -> None:
    """Drop libvirt's cached probe of a QEMU binary that is going away (the cache
    file is named after the SHA-256 of the binary's path)."""
    digest = hashlib.sha256(str(binary).encode()).hexdigest()
    Path(f"{CAPABILITIES_CACHE}/{digest}.xml").unlink(missing_ok=True)
