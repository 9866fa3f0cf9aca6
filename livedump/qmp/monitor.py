"""The monitor commands livedump sends, over any :class:`~livedump.qmp.transport.Transport`
(a QMP connection, or libvirt's pass-through), with their replies checked."""

import re
from collections.abc import Mapping
from dataclasses import dataclass

from livedump.errors import MonitorError
from livedump.qmp.transport import RESUME_TIMEOUT, Transport, excerpt

Command = tuple[str, dict[str, object]]  # a QMP command and its arguments


@dataclass(frozen=True)
class RamBlock:
    """One of QEMU's RAM blocks, as ``info ramblock`` lists it."""

    name: str  # "pc.ram", or with its device's path: "0000:00:02.0/vga.vram"
    used: int  # bytes the guest can use now
    total: int  # bytes it may grow to
    host: int | None  # its address in QEMU: shown from QEMU 8.0 on


# "                  pc.ram    4 KiB  0x0000000000000000 0x0000000040000000 0x0000000040000000"
# and from QEMU 8.0 " 0x00007ff0afe00000  rw" after it. A name may be empty, or hold spaces.
_RAMBLOCK = re.compile(
    r"^\s*(?P<name>.*?)\s+\d+(?:\.\d+)? [KMGTPE]?i?B\s+0x[0-9a-f]+ 0x(?P<used>[0-9a-f]+)"
    r" 0x(?P<total>[0-9a-f]+)(?: 0x(?P<host>[0-9a-f]+)\s+r[ow])?$"
)


def parse_ram_blocks(text: str) -> list[RamBlock]:
    """The blocks in ``info ramblock`` output, of QEMU 7.2's form or 8.0's."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].split()[:2] != ["Block", "Name"]:
        raise unexpected("info ramblock", text)
    blocks = []
    for line in lines[1:]:
        m = _RAMBLOCK.match(line)
        if not m:
            raise MonitorError(f"unexpected line in 'info ramblock': {excerpt(line.strip())}")
        blocks.append(RamBlock(m["name"], int(m["used"], 16), int(m["total"], 16),
                               int(m["host"], 16) if m["host"] else None))
    return blocks


def unexpected(command: str, reply: object) -> MonitorError:
    """The error for a reply to ``command`` that is not what QEMU sends."""
    return MonitorError(f"unexpected reply to {command!r}: {excerpt(reply)}")


_TARGET = re.compile(r"[a-z][a-z0-9_]{0,31}")  # x86_64, ppc64, s390x...
_MIGRATION_STATUS = re.compile(r"[a-z][a-z-]{0,31}")  # none, active, postcopy-active...


def capabilities_command(states: Mapping[str, bool]) -> Command:
    """The command that sets migration capabilities to ``states``."""
    return "migrate-set-capabilities", {"capabilities": [
        {"capability": name, "state": state} for name, state in states.items()]}


class Monitor:
    """The monitor commands livedump uses."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def running(self) -> bool:
        """Whether the guest's vCPUs are running now."""
        status = self.transport.execute("query-status")
        running = status.get("running") if isinstance(status, dict) else None
        if not isinstance(running, bool):  # "false" is no answer either way
            raise unexpected("query-status", status)
        return running

    def stop(self) -> None:
        """Pause the guest, and confirm it is paused: QEMU answers ``stop`` once
        every vCPU is paused, so one more round trip, with the guest already
        held, is all the confirmation costs."""
        self.transport.execute("stop")
        if self.running():
            raise MonitorError("the monitor answered 'stop', but the guest still runs")

    def cont(self) -> None:
        # Resuming is what matters most: a slow monitor gets longer to answer,
        # and never less than the user allows every other command.
        allowed = getattr(self.transport, "timeout", None)
        self.transport.execute("cont", timeout=max(RESUME_TIMEOUT, allowed or 0.0))

    def target_arch(self) -> str:
        """The QEMU target, as ``query-target`` names it (``x86_64``, ``ppc64``...)."""
        reply = self.transport.execute("query-target")
        arch = reply.get("arch") if isinstance(reply, dict) else None
        if not isinstance(arch, str) or not _TARGET.fullmatch(arch):
            raise unexpected("query-target", reply)
        return arch

    def first_cpu_is_aarch64(self) -> bool:
        """Whether the first vCPU, the one QEMU's dump judges by, is an AArch64 one
        (qemu-system-aarch64 also runs AArch32 models, -cpu cortex-a15): its QOM
        ``aarch64`` property, which only AArch64 models have. A QOM attribute of
        the model, not a register: asked while the guest runs, it stops nothing."""
        cpus = self.transport.execute("query-cpus-fast")
        try:
            path = cpus[0]["qom-path"]  # type: ignore[index]
            if not isinstance(path, str):
                raise TypeError
        except (TypeError, KeyError, IndexError):
            raise unexpected("query-cpus-fast", cpus) from None
        listed = self.transport.execute("qom-list", {"path": path})
        try:
            names = {p["name"] for p in listed}  # type: ignore[attr-defined]
        except (TypeError, KeyError):
            raise unexpected("qom-list", listed) from None
        if "aarch64" not in names:
            if "midr" not in names:  # Every Arm CPU has its ID register's property.
                raise MonitorError(f"CPU {path} is not an Arm CPU: it has no 'midr' property")
            return False
        value = self.transport.execute("qom-get", {"path": path, "property": "aarch64"})
        if not isinstance(value, bool):
            raise unexpected("qom-get aarch64", value)
        return value

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a file descriptor, known to it as ``name`` (QMP ``getfd``)."""
        self.transport.send_fd(fd)
        self.transport.execute("getfd", {"fdname": name})

    def version(self) -> tuple[int, int, int]:
        """QEMU's version, (major, minor, micro)."""
        reply = self.transport.execute("query-version")
        try:
            v = reply["qemu"]  # type: ignore[index]
            return int(v["major"]), int(v["minor"]), int(v["micro"])
        except (TypeError, KeyError, ValueError):
            raise unexpected("query-version", reply) from None

    def migration_status(self) -> tuple[str, str]:
        """The state of the last migration (``none`` if there was none), and why
        it failed if it did (else "")."""
        reply = self.transport.execute("query-migrate")
        if not isinstance(reply, dict):
            raise unexpected("query-migrate", reply)
        status = reply.get("status", "none")
        if not isinstance(status, str) or not _MIGRATION_STATUS.fullmatch(status):
            raise unexpected("query-migrate", reply)
        return status, excerpt(str(reply.get("error-desc", "")), quote=False)

    def migration_capabilities(self) -> dict[str, bool]:
        reply = self.transport.execute("query-migrate-capabilities")
        try:
            if not isinstance(reply, list):
                raise TypeError
            states = {c["capability"]: c["state"] for c in reply}
        except (TypeError, KeyError):
            raise unexpected("query-migrate-capabilities", reply) from None
        if not all(isinstance(n, str) and isinstance(v, bool) for n, v in states.items()):
            raise unexpected("query-migrate-capabilities", reply)
        return states

    def set_migration_capabilities(self, states: Mapping[str, bool]) -> None:
        self.transport.execute(*capabilities_command(states))

    def migration_parameters(self) -> dict[str, object]:
        reply = self.transport.execute("query-migrate-parameters")
        if not isinstance(reply, dict):
            raise unexpected("query-migrate-parameters", reply)
        return reply

    def set_migration_parameters(self, values: Mapping[str, object]) -> None:
        self.transport.execute("migrate-set-parameters", values)

    def migrate(self, uri: str) -> None:
        self.transport.execute("migrate", {"uri": uri})

    def migrate_cancel(self) -> None:
        self.transport.execute("migrate_cancel")

    def close_fd(self, name: str) -> None:
        """Have QEMU close a file descriptor passed with :meth:`send_fd` and not used."""
        self.transport.execute("closefd", {"fdname": name})

    def ram_blocks(self) -> list[RamBlock]:
        """QEMU's RAM blocks: what the RAM map is checked against."""
        return parse_ram_blocks(self.hmp("info ramblock"))

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command and return its text."""
        reply = self.transport.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(reply, str):
            raise unexpected(command_line, reply)
        return reply

    def cpu_count(self) -> int:
        """How many vCPUs the VM has (``query-cpus-fast``: the guest runs on)."""
        reply = self.transport.execute("query-cpus-fast")
        if not isinstance(reply, list) or not reply:
            raise unexpected("query-cpus-fast", reply)
        return len(reply)

    def events(self) -> list[tuple[str, float]]:
        """The events QEMU sent since the last call, by name, with QEMU's timestamps
        (seconds); none where the transport keeps none (libvirt's pass-through)."""
        taken = getattr(self.transport, "events", None)
        found = []
        for event in taken() if callable(taken) else []:
            stamp = event.get("timestamp")
            name = event.get("event")
            if isinstance(stamp, dict) and isinstance(name, str):
                found.append((name, float(stamp.get("seconds", 0))
                              + float(stamp.get("microseconds", 0)) / 1e6))
        return found

    def close(self) -> None:
        self.transport.close()
