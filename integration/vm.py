"""Throwaway QEMU virtual machines for tests, benchmarks and the demo.

Each VM is a real ``qemu-system-*`` with no disk (the firmware runs and
idles), known bytes placed at known guest-physical addresses with
``-device loader``, and two QMP sockets: ``livedump.sock`` for the tool under
test and ``harness.sock``, held by the harness to steer and check the VM.
Its :class:`Platform` says which emulator, machine and firmware: an x86 PC
with SeaBIOS unless told otherwise.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from .firmware import (
    PPC64_H_SET_MODE_LE,
    PPC64_HID0_HILE,
    S390X_SPIN,
    X86_64_LONG_MODE,
    X86_COUNTER,
    X86_HALT,
    X86_SWEEPER,
    Firmware,
    aarch64,
)
from .qemus import Qemu

# The x86 QEMU of the tests that do not run on every QEMU (conftest.py's
# ``qemu`` fixture gives each of them to the tests that do).
QEMU = Qemu(Path(os.environ.get("LIVEDUMP_TEST_QEMU", "qemu-system-x86_64")))
# How long the harness waits for an answer on its own monitor: a QEMU whose
# main loop hangs fails the test instead of holding it.
COMMAND_TIMEOUT = 30.0
# The VMs running now, for conftest.py to describe when a test fails.
RUNNING: dict[int, "VM"] = {}


def threads_of(pid: int) -> str:
    """Each thread of process ``pid``: name, state, where it waits in the kernel and
    its CPU time, to tell a busy QEMU from a blocked one after a timeout."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            wchan = (task / "wchan").read_text().strip() or "-"
            ticks = int(fields[11]) + int(fields[12])
            lines.append(f"  {task.name} {name!r} state {fields[0]} wchan {wchan} "
                         f"cpu {ticks / os.sysconf('SC_CLK_TCK'):.2f} s")
    return "\n".join(lines)


def emulator(qemu: Qemu | str) -> Qemu:
    """``qemu`` as a Qemu: a bare string names a binary (on PATH, or a path)."""
    return qemu if isinstance(qemu, Qemu) else Qemu(Path(qemu))


@dataclass(frozen=True)
class Platform:
    """A QEMU emulator and machine, and what a firmware-only guest needs there.

    ``firmware`` is an image of ours and the option that loads it
    (``-bios``, ``-kernel``); ``ram_base`` is where the machine's RAM starts.
    """

    qemu: Qemu | str
    machine: str
    args: tuple[str, ...] = ()
    firmware: tuple[str, Firmware] | None = None
    ram_base: int = 0

    def command(self) -> list[str]:
        """The emulator and the options for this platform, with the firmware built."""
        args = [*emulator(self.qemu).command(), "-M", self.machine, *self.args]
        if self.firmware is not None:
            option, firmware = self.firmware
            args += [option, str(firmware.build())]
        return args


PC = Platform(QEMU, "pc", ("-vga", "std"))
# PCs running a firmware of ours that halts, counts, or sweeps its memory
# (integration/firmware.py).
HALTING_PC = replace(PC, firmware=("-bios", X86_HALT))
COUNTING_PC = replace(PC, firmware=("-bios", X86_COUNTER))
SWEEPING_PC = replace(PC, firmware=("-bios", X86_SWEEPER))


def pause_of(events: list[dict]) -> float:
    """Seconds from the last STOP among QMP ``events`` to the first RESUME after
    it, by QEMU's own timestamps: how long QEMU held the guest."""
    stop = resume = None
    for e in events:
        ts = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        if e["event"] == "STOP":
            stop, resume = ts, None
        elif e["event"] == "RESUME" and stop is not None and resume is None:
            resume = ts
    if stop is None or resume is None:
        raise RuntimeError("no STOP/RESUME pair seen")
    return resume - stop


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

    machine: str | None = None  # None: the platform's
    memory: str = "1G"
    markers: list[Marker] = field(default_factory=list)
    start_paused: bool = False
    accel: str = "tcg"
    extra: list[str] = field(default_factory=list)
    platform: Platform = PC
    qemu: Qemu | str | None = None  # another build of the platform's emulator
    # False: the harness's socket is the VM's only monitor, as with libvirt.
    livedump_socket: bool = True
    # Each harness command's limit; a slow guest raises it.
    command_timeout: float = COMMAND_TIMEOUT

    def __enter__(self) -> "VM":
        self.dir = Path(tempfile.mkdtemp(prefix="livedump-vm-"))
        self.socket = self.dir / "livedump.sock"
        self.harness_socket = self.dir / "harness.sock"
        platform = replace(self.platform, qemu=self.qemu or self.platform.qemu,
                           machine=self.machine or self.platform.machine)
        args = [
            *platform.command(), "-m", self.memory, "-display", "none",
            "-nodefaults", "-no-user-config",
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
        self.args = args
        self.log = open(self.dir / "qemu.log", "wb")
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        RUNNING[id(self)] = self
        try:
            self._wait_for_socket(self.harness_socket)
            deadline = time.monotonic() + 5
            while True:
                self.qmp = QEMUMonitorProtocol(str(self.harness_socket))
                try:
                    self.qmp.connect()
                    break
                except Exception:
                    # Refused: QEMU may be giving up on its options (say why if so),
                    # or it has bound its socket and does not listen on it yet.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=0.1)
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise
            # A QEMU whose main loop hangs fails the test instead of holding it.
            self.qmp.settimeout(self.command_timeout)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_socket(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU did not create its QMP socket")
            time.sleep(0.02)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"QEMU exited: {(self.dir / 'qemu.log').read_text()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, name: str, **args: object) -> object:
        return self.qmp.cmd(name, **args)

    def status(self) -> str:
        return self.command("query-status")["status"]

    def hmp(self, command_line: str) -> str:
        return self.command("human-monitor-command", **{"command-line": command_line})

    def read_u32(self, gpa: int) -> int:
        """The 32-bit word at guest-physical ``gpa``, read without pausing the guest."""
        # "0000000000001000: 0x0000abcd"
        return int(self.hmp(f"xp /1wx {gpa:#x}").split(":")[1], 16)

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

    def own_dump(self, path: Path, **span: int) -> None:
        """QEMU's own ``dump-guest-memory`` (paging off) into ``path``; waits for it.

        ``span``: ``begin`` and ``length``, to dump only that guest-physical range.
        """
        self.command("dump-guest-memory", paging=False, protocol=f"file:{path}", **span)
        deadline = time.monotonic() + 600
        while self.command("query-dump")["status"] == "active":
            if time.monotonic() > deadline:
                raise TimeoutError("dump-guest-memory did not finish")
            time.sleep(0.05)
        assert self.command("query-dump")["status"] == "completed"

    def describe(self) -> str:
        """What this QEMU is doing now and the end of its log, for a failed test."""
        if self.process.poll() is not None:
            return f"QEMU {self.pid} exited with {self.process.returncode}"
        self.log.flush()
        tail = (self.dir / "qemu.log").read_bytes()[-2000:].decode(errors="replace")
        return (f"QEMU {self.pid} ({' '.join(self.args[:1])}), threads:\n"
                f"{threads_of(self.pid)}\nend of its log:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None and hasattr(self, "process"):
            with contextlib.suppress(Exception):
                print(f"failing with {self.describe()}", file=sys.stderr)
        RUNNING.pop(id(self), None)
        try:
            if hasattr(self, "qmp"):
                self.qmp.close()
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


# One platform for each ELF identity QEMU's dump can have (see firmware.py
# for how each firmware puts the CPU in the state that decides it).
ARCH_PLATFORMS = {
    # Long mode: EM_X86_64.
    "x86_64": Platform(QEMU, "pc", ("-vga", "std"), ("-bios", X86_64_LONG_MODE)),
    # SeaBIOS idles out of long mode: EM_386. As a ROM it ends at 4 GiB, which
    # makes QEMU's dump ELF64; as flash (a ROM device, not dumped) it does not.
    "386-elf64": Platform("qemu-system-i386", "pc"),
    "386-elf32": Platform("qemu-system-i386", "pc", (
        "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/seabios/bios.bin")),
    "aarch64-le": Platform("qemu-system-aarch64", "virt", ("-cpu", "cortex-a57"),
                           ("-bios", aarch64(big_endian=False)), ram_base=0x4000_0000),
    "aarch64-be": Platform("qemu-system-aarch64", "virt", ("-cpu", "cortex-a57"),
                           ("-bios", aarch64(big_endian=True)), ram_base=0x4000_0000),
    # A little-endian pseries guest, dumped big-endian by QEMU 7.2.
    "ppc64-be": Platform("qemu-system-ppc64", "pseries", (), ("-bios", PPC64_H_SET_MODE_LE)),
    "ppc64-le": Platform("qemu-system-ppc64", "powernv9", (), ("-bios", PPC64_HID0_HILE)),
    "s390": Platform("qemu-system-s390x", "s390-ccw-virtio", (), ("-kernel", S390X_SPIN)),
}
