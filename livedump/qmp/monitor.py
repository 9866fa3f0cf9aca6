"""Talking to QEMU's monitor: a transport that carries QMP, and the commands we send.

:class:`QMPTransport` owns a socket and a :mod:`qemu.qmp` client and runs
each exchange to completion with a timeout, so the rest of livedump is
plain synchronous code. :class:`Monitor` holds the few commands livedump
needs and works over any :class:`Transport`.
"""

import asyncio
import logging
import re
import socket
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Protocol

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError
from qemu.qmp.error import ProtocolError

from livedump import signals
from livedump.errors import MonitorError, MonitorUnavailable, PermissionDenied
from livedump.qmp import peer
from livedump.qmp.framing import Framer
from livedump.vm.process import Address as Address  # Known from here to the rest of livedump.
from livedump.vm.process import describe as describe

# qemu.qmp logs every failed connect at ERROR level; we report failures ourselves.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

RESUME_TIMEOUT = 30.0


class _SessionBroken(MonitorUnavailable):
    """The connection ended under us (as opposed to a monitor that is slow)."""


class _Client(QMPClient):
    """qemu.qmp's client, which takes a line for a message, given whole messages
    from a pretty-printed monitor too."""

    def __init__(self) -> None:
        super().__init__("livedump")
        self._framer = Framer(self.readbuflen)

    async def _readline(self) -> bytes:
        while True:
            line = await super()._readline()
            if not line.endswith(b"\n"):  # The stream ended: what came, for the parser.
                return self._framer.take() + line
            if (message := self._framer.add(line)) is not None:
                return message


class Transport(Protocol):
    def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                timeout: float | None = None) -> object:
        """Run one QMP command and return its ``return`` value (``timeout``: not the default)."""

    def send_fd(self, fd: int) -> None:
        """Pass a file descriptor to QEMU over the connection (SCM_RIGHTS)."""

    def close(self) -> None:
        """End the session."""


class QMPTransport:
    """A QMP session on a UNIX or TCP socket, with every exchange bounded by ``timeout``.

    A monitor that another client holds (libvirt, say) accepts the connection
    but never greets; the greeting timeout is what tells us so. Every
    connection's other end must be the QEMU process ``peer_pid`` (given, or
    found on the first connection), never a relay.
    """

    def __init__(self, address: Address, timeout: float, pid: int | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.peer_pid = pid
        self._connected = False
        self._connect()

    def _connect(self) -> None:
        address = self.address
        self._runner = asyncio.Runner()
        self._client = _Client()
        try:
            sock = self._open_socket(address)
        except PermissionError as e:
            self._runner.close()
            raise PermissionDenied(f"cannot connect to {describe(address)}: {e.strerror}") from None
        except OSError as e:
            self._runner.close()
            reason = "timed out" if isinstance(e, TimeoutError) else e.strerror or str(e)
            raise MonitorUnavailable(f"{describe(address)}: {reason}") from None
        try:
            # A UNIX peer is known at once, so a relay is not even read from;
            # a TCP one once QEMU accepted the connection, which its greeting shows.
            if sock.family == socket.AF_UNIX:
                self.peer_pid = peer.serving(sock, describe(address), self.peer_pid)
            self._run(lambda: self._client.connect(sock), "greeting")
            if sock.family != socket.AF_UNIX:
                self.peer_pid = peer.serving(sock, describe(address), self.peer_pid)
        except BaseException:
            self._runner.close()
            sock.close()
            raise
        self._sock = sock
        self._connected = True

    def send_fd(self, fd: int) -> None:
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise MonitorError(f"{describe(self.address)}: cannot pass a file to QEMU: "
                               f"{excerpt(str(e), quote=False)}") from None

    @property
    def passes_fds(self) -> bool:
        """Whether files can be passed to QEMU on this connection: on a UNIX socket only."""
        return self._sock.family == socket.AF_UNIX

    def fileno(self) -> int:
        """The connection's file descriptor, for a process that must be able to speak on it."""
        return self._sock.fileno()

    def _open_socket(self, address: Address) -> socket.socket:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address, timeout=self.timeout)
        sock.setblocking(False)
        return sock

    def _run(self, exchange: Callable[[], Coroutine[object, object, object]], what: str,
             timeout: float | None = None) -> object:
        """Run the coroutine ``exchange()`` makes; it is made with signals held, so a signal
        cannot leave it created but never awaited."""
        timeout = timeout or self.timeout
        with signals.deferred():
            try:
                return self._runner.run(asyncio.wait_for(exchange(), timeout))
            except TimeoutError:
                raise MonitorUnavailable(
                    f"{describe(self.address)}: no {what} within {timeout:g} s"
                ) from None
            except ExecuteError:
                raise
            except ExecInterruptedError as e:
                # The session ended under the command; ending it on our side says why.
                cause: BaseException = self._ended() or e
            except ConnectError as e:  # The greeting, or the capabilities' negotiation.
                cause = e.exc
            except (QMPError, OSError, EOFError) as e:
                cause = e
            if isinstance(cause, (ProtocolError, ValueError)):
                self.close()
                raise MonitorError(f"{describe(self.address)}: garbled {what}, not QMP: "
                                   f"{excerpt(_received(cause))}") from None
            reason = ("the connection was closed" if isinstance(cause, EOFError)
                      else excerpt(str(cause) or type(cause).__name__, quote=False))
            raise _SessionBroken(f"{describe(self.address)}: {what} failed: {reason}") from None

    def _ended(self) -> BaseException | None:
        """End a session that broke under a command: what ended it, if anything did."""
        try:
            self._runner.run(asyncio.wait_for(self._client.disconnect(), self.timeout))
        except Exception as e:
            return e
        return None

    def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                timeout: float | None = None) -> object:
        """Run ``command``; if the session broke (QEMU or a relay dropped it), once more
        on a new session: the monitor takes a new client, and every command livedump
        sends may be repeated."""
        if not self._connected:  # An earlier attempt to reconnect failed; try again.
            self._connect()
        try:
            return self._execute(command, arguments, timeout)
        except _SessionBroken:
            self.close()
            self._connect()
            return self._execute(command, arguments, timeout)

    def _execute(self, command: str, arguments: Mapping[str, object] | None,
                 timeout: float | None) -> object:
        try:
            line = arguments.get("command-line") if arguments else None
            return self._run(lambda: self._client.execute(command, arguments),
                             f"reply to {line or command!r}", timeout)
        except ExecuteError as e:
            raise MonitorError(f"QEMU refused {command!r}: {excerpt(e.error.error.desc)}"
                               ) from None

    def close(self) -> None:
        if not self._connected:
            return
        self._connected = False
        with signals.deferred():
            goodbye = self._client.disconnect()
            try:
                self._runner.run(asyncio.wait_for(goodbye, self.timeout))
            except Exception:
                goodbye.close()  # Not awaited if the loop could not run it; that is fine.
            finally:
                self._runner.close()


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


EXCERPT = 60  # characters of a reply that a message shows at most


def _received(error: BaseException) -> object:
    """What a monitor sent that QMP cannot be, as far as ``error`` tells."""
    while isinstance(getattr(error, "exc", None), BaseException):  # wrapped by qemu.qmp
        error = error.exc  # type: ignore[attr-defined]
    for name in ("raw", "object", "value", "msg"):  # bytes, JSON, or a message
        if hasattr(error, name):
            value = getattr(error, name)
            return dict(value) if isinstance(value, Message) else value
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


def excerpt(reply: object, quote: bool = True) -> str:
    """``reply`` as a message shows it: its ``repr`` (with ``quote`` false,
    the text itself), cut short if long. Every message that shows what a
    monitor sent shows it through here: a garbled monitor can send anything,
    of any length, and a message is one line."""
    text = repr(reply) if quote else str(reply)
    if len(text) <= EXCERPT:
        return text
    return f"{text[:EXCERPT]}... ({len(text)} characters)"


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
        # Resuming is what matters most: a slow monitor gets longer to answer.
        self.transport.execute("cont", timeout=RESUME_TIMEOUT)

    def target_arch(self) -> str:
        """The QEMU target, as ``query-target`` names it (``x86_64``, ``ppc64``...)."""
        reply = self.transport.execute("query-target")
        arch = reply.get("arch") if isinstance(reply, dict) else None
        if not isinstance(arch, str) or not _TARGET.fullmatch(arch):
            raise unexpected("query-target", reply)
        return arch

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

    def close(self) -> None:
        self.transport.close()
