"""Talking to QEMU's monitor: a transport that carries QMP, and the commands we send.

:class:`QMPTransport` owns a socket and a :mod:`qemu.qmp` client and runs
each exchange to completion with a timeout, so the rest of livedump is
plain synchronous code. :class:`Monitor` holds the few commands livedump
needs and works over any :class:`Transport`.
"""

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Coroutine, Mapping
from typing import Protocol

from qemu.qmp import ExecuteError, QMPClient, QMPError

from . import signals
from .errors import MonitorError, MonitorUnavailable, PermissionDenied

# qemu.qmp logs every failed connect at ERROR level; we report failures ourselves.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

Address = str | tuple[str, int]
RESUME_TIMEOUT = 30.0


class _SessionBroken(MonitorUnavailable):
    """The connection ended under us (as opposed to a monitor that is slow)."""


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
    but never greets; the greeting timeout is what tells us so.
    """

    def __init__(self, address: Address, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.peer_pid: int | None = None
        self._connected = False
        self._connect()

    def _connect(self) -> None:
        address = self.address
        self._runner = asyncio.Runner()
        self._client = QMPClient("livedump")
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
            self._run(lambda: self._client.connect(sock), "greeting")
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
            raise MonitorError(f"{describe(self.address)}: cannot pass a file to QEMU: {e}") from None

    def fileno(self) -> int:
        """The connection's file descriptor, for a process that must be able to speak on it."""
        return self._sock.fileno()

    def _open_socket(self, address: Address) -> socket.socket:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(address)
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                self.peer_pid = struct.unpack("3i", creds)[0] or None
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
            except (TimeoutError, asyncio.TimeoutError):
                raise MonitorUnavailable(
                    f"{describe(self.address)}: no {what} within {timeout:g} s"
                ) from None
            except ExecuteError:
                raise
            except (QMPError, OSError, EOFError) as e:
                raise _SessionBroken(f"{describe(self.address)}: {what} failed: {e}") from None

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
            return self._run(lambda: self._client.execute(command, arguments),
                             f"reply to {command!r}", timeout)
        except ExecuteError as e:
            raise MonitorError(f"QEMU refused {command!r}: {e.error.error.desc}") from None

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


def describe(address: Address) -> str:
    """How an address appears in messages: ``unix:PATH`` or ``tcp:HOST:PORT``."""
    if isinstance(address, str):
        return f"unix:{address}"
    return f"tcp:{address[0]}:{address[1]}"


Command = tuple[str, dict[str, object]]  # a QMP command and its arguments


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
        if not isinstance(status, dict) or "running" not in status:
            raise MonitorError(f"unexpected 'query-status' reply: {status!r}")
        return bool(status["running"])

    def stop(self) -> None:
        self.transport.execute("stop")

    def cont(self) -> None:
        # Resuming is what matters most: a slow monitor gets longer to answer.
        self.transport.execute("cont", timeout=RESUME_TIMEOUT)

    def target_arch(self) -> str:
        """The QEMU target, as ``query-target`` names it (``x86_64``, ``ppc64``...)."""
        reply = self.transport.execute("query-target")
        if not isinstance(reply, dict) or not isinstance(reply.get("arch"), str):
            raise MonitorError(f"unexpected 'query-target' reply: {reply!r}")
        return reply["arch"]

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
            raise MonitorError(f"unexpected 'query-version' reply: {reply!r}") from None

    def migration_status(self) -> tuple[str, str]:
        """The state of the last migration (``none`` if there was none), and why
        it failed if it did (else "")."""
        reply = self.transport.execute("query-migrate")
        if not isinstance(reply, dict):
            raise MonitorError(f"unexpected 'query-migrate' reply: {reply!r}")
        return str(reply.get("status", "none")), str(reply.get("error-desc", ""))

    def migration_capabilities(self) -> dict[str, bool]:
        reply = self.transport.execute("query-migrate-capabilities")
        try:
            return {str(c["capability"]): bool(c["state"]) for c in reply}  # type: ignore
        except (TypeError, KeyError):
            raise MonitorError(
                f"unexpected 'query-migrate-capabilities' reply: {reply!r}") from None

    def set_migration_capabilities(self, states: Mapping[str, bool]) -> None:
        self.transport.execute(*capabilities_command(states))

    def migration_parameters(self) -> dict[str, object]:
        reply = self.transport.execute("query-migrate-parameters")
        if not isinstance(reply, dict):
            raise MonitorError(f"unexpected 'query-migrate-parameters' reply: {reply!r}")
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

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command and return its text."""
        reply = self.transport.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(reply, str):
            raise MonitorError(f"unexpected reply to {command_line!r}: {reply!r}")
        return reply

    def close(self) -> None:
        self.transport.close()
