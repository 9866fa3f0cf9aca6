"""A QMP connection whose every exchange is bounded, so the rest of livedump is
plain synchronous code.

:class:`QMPTransport` owns a socket and a :mod:`qemu.qmp` client, checks
that QEMU itself is at the other end (:mod:`livedump.qmp.peer`), reads
pretty-printed monitors as well (:mod:`livedump.qmp.framing`), and runs each
exchange to completion with a timeout; a session that breaks is opened
again once. Its failures are livedump's errors, each one line with at most a
short excerpt of what the monitor sent.
"""

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine, Mapping
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

    def events(self) -> list[dict[str, object]]:
        """The events QEMU sent since the last call: read along with the replies
        to commands, so a caller that wants them sends commands now and then."""
        return [dict(m) for m in self._client.events.clear()] if self._connected else []

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
