"""Throwaway QEMU virtual machines for tests, benchmarks and the demo.

Each VM is a real ``qemu-system-x86_64`` with no disk (the firmware runs and
idles), known bytes placed at known guest-physical addresses with
``-device loader``, and two QMP sockets: ``livedump.sock`` for the tool under
test and ``harness.sock``, held by the harness to steer and check the VM.
"""

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = os.environ.get("LIVEDUMP_TEST_QEMU", "qemu-system-x86_64")


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@dataclass
class Marker:
    """Bytes the VM finds at guest-physical address ``gpa`` from power-on."""

    gpa: int
    data: bytes


@dataclass
class VM:
    """A running QEMU; use as a context manager so it is always killed."""

    machine: str = "pc"
    memory: str = "1G"
    markers: list[Marker] = field(default_factory=list)
    start_paused: bool = False
    accel: str = "tcg"
    extra: list[str] = field(default_factory=list)
    qemu: str = QEMU
    # False: the harness's socket is the VM's only monitor, as with libvirt.
    livedump_socket: bool = True

    def __enter__(self) -> "VM":
        self.dir = Path(tempfile.mkdtemp(prefix="livedump-vm-"))
        self.socket = self.dir / "livedump.sock"
        self.harness_socket = self.dir / "harness.sock"
        args = [
            self.qemu, "-M", self.machine, "-m", self.memory, "-display", "none",
            "-nodefaults", "-no-user-config", "-vga", "std",
            "-qmp", f"unix:{self.harness_socket},server=on,wait=off",
        ]
        if self.livedump_socket:
            args[-2:-2] = ["-qmp", f"unix:{self.socket},server=on,wait=off"]
        args += ["-accel", "kvm", "-accel", "tcg"] if self.accel == "kvm" else ["-accel", "tcg"]
        for i, m in enumerate(self.markers):
            path = self.dir / f"marker{i}.bin"
            path.write_bytes(m.data)
            args += ["-device", f"loader,file={path},addr={m.gpa:#x},force-raw=on"]
        if self.start_paused:
            args.append("-S")
        args += self.extra
        self.log = open(self.dir / "qemu.log", "wb")
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        try:
            self._wait_for_socket(self.harness_socket)
            self.qmp = QEMUMonitorProtocol(str(self.harness_socket))
            self.qmp.connect()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_socket(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(self.dir / 'qemu.log').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU did not create its QMP socket")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, name: str, **args: object) -> object:
        return self.qmp.cmd(name, **args)

    def status(self) -> str:
        return self.command("query-status")["status"]

    def event_log(self) -> list[dict]:
        """The QMP events (STOP, RESUME, ...) since the last call, with QEMU's timestamps."""
        self.status()  # The client only takes in events while it talks to QEMU.
        events = self.qmp.get_events(wait=False)
        self.qmp.clear_events()
        return events

    def events(self) -> list[str]:
        return [e["event"] for e in self.event_log()]

    def wait_running(self, seconds: float = 2.0) -> None:
        """Let the firmware run for a while, so the guest is really live."""
        assert self.status() == "running"
        time.sleep(seconds)

    def own_dump(self, path: Path) -> None:
        """QEMU's own ``dump-guest-memory`` (paging off) into ``path``; waits for it."""
        self.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
        deadline = time.monotonic() + 600
        while self.command("query-dump")["status"] == "active":
            if time.monotonic() > deadline:
                raise TimeoutError("dump-guest-memory did not finish")
            time.sleep(0.05)
        assert self.command("query-dump")["status"] == "completed"

    def __exit__(self, *exc: object) -> None:
        try:
            if hasattr(self, "qmp"):
                self.qmp.close()
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)
