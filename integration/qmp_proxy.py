"""A QMP relay that misbehaves on cue, for fault-injection tests.

It sits between livedump and QEMU's monitor socket and passes everything
through, except that it can hold back QEMU's greeting, hold back QEMU's
reply to a chosen command, cut the connection when that command is sent,
drop the connection at any moment (:meth:`drop`), answer commands itself
(``answer``) or change QEMU's replies (``rewrite``). ``seen`` fires when the
chosen command goes by, so a test can act at exactly that moment. Each new
client gets a new session with QEMU, as with QEMU itself.

livedump talks only to a monitor whose peer is the QEMU process. By default
the relay passes that check as only someone able to take QEMU's descriptors
could: QEMU makes a listening socket (a chardev added over QMP), a client
of the relay's keeps QEMU from accepting on it, and the relay takes it from
QEMU (pidfd_getfd) and accepts there, so the kernel names QEMU as the peer.
With ``as_qemu=False`` it listens on a socket of its own, UNIX or TCP
(``tcp=True``), as a relay such as socat would, and livedump must refuse it.
"""

import contextlib
import ctypes
import itertools
import json
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
_libc = ctypes.CDLL(None, use_errno=True)
_chardevs = itertools.count()

Answer = Callable[[dict], "dict | None"]  # a request -> the reply to send instead of QEMU's
Rewrite = Callable[[dict, dict], dict]  # a request and QEMU's reply -> the reply to send


class QMPProxy:
    def __init__(self, upstream: Path, command: str | None = None, *, delay: float = 0.0,
                 cut: bool = False, greeting_delay: float = 0.0, as_qemu: bool = True,
                 tcp: bool = False, answer: Answer | None = None,
                 rewrite: Rewrite | None = None) -> None:
        assert not (as_qemu and tcp), "QEMU's socket for the relay is a UNIX one"
        self.upstream = upstream
        self.command = command
        self.delay = delay
        self.cut = cut
        self.greeting_delay = greeting_delay
        self.answer = answer
        self.rewrite = rewrite
        self.seen = threading.Event()
        self.connections = 0
        self.sent: list[dict] = []  # every message the client sent, in order
        self.received = bytearray()  # every byte the client sent, as it came
        self._current: list[socket.socket] = []
        self._closed = False
        self._park: socket.socket | None = None
        self.dir = tempfile.mkdtemp(prefix="livedump-proxy-")
        self.path = Path(self.dir) / "proxy.sock"
        if as_qemu:
            self._server = self._listen_in_qemu()
        elif tcp:
            self._server = socket.create_server(("127.0.0.1", 0))
        else:
            self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._server.bind(str(self.path))
            self._server.listen(4)
        self.qmp = (f"tcp:127.0.0.1:{self._server.getsockname()[1]}" if tcp
                    else str(self.path))  # what livedump's --qmp is given
        threading.Thread(target=self._accept, daemon=True).start()

    def _listen_in_qemu(self) -> socket.socket:
        """A socket QEMU listens on at ``path``, taken from QEMU to accept on."""
        qmp = QEMUMonitorProtocol(str(self.upstream))
        qmp.connect()
        try:
            label = f"livedump-proxy-{next(_chardevs)}"
            qmp.cmd("chardev-add", id=label, backend={"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": str(self.path)}},
                "server": True, "wait": False}})
            # QEMU stops accepting on a socket chardev while it has a client.
            self._park = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._park.connect(str(self.path))
            deadline = time.monotonic() + 10
            while next(c["filename"] for c in qmp.cmd("query-chardev")
                       if c["label"] == label).startswith("disconnected:"):
                assert time.monotonic() < deadline, "QEMU never took the parking client"
                time.sleep(0.01)
        finally:
            qmp.close()
        creds = self._park.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
        qemu = struct.unpack("3i", creds)[0]
        pidfd = os.pidfd_open(qemu)
        try:
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, _fd_of(qemu, _listener(self.path)), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
        finally:
            os.close(pidfd)
        return socket.socket(fileno=fd)

    def drop(self) -> None:
        """Cut the current connection, both ways, now."""
        for s in self._current:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        # Polled: QEMU's socket is non-blocking (a flag its copy shares with ours).
        while not self._closed:
            try:
                if not select.select([self._server], [], [], 0.1)[0]:
                    continue
                client, _ = self._server.accept()
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                return
            client.setblocking(True)
            self.connections += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu.connect(str(self.upstream))
        self._current = [client, qemu]
        hold = threading.Event()
        if self.greeting_delay:
            threading.Timer(self.greeting_delay, hold.set).start()
        else:
            hold.set()
        pending: dict[str, dict] = {}  # requests by id, for rewrite
        threading.Thread(target=self._to_client, args=(qemu, client, hold, pending),
                         daemon=True).start()
        decoder = json.JSONDecoder()
        buf = ""
        try:
            while data := client.recv(65536):
                self.received += data
                buf += data.decode(errors="replace")
                # QMP messages are JSON objects, not necessarily one per line.
                while buf.strip():
                    buf = buf.lstrip()
                    try:
                        message, end = decoder.raw_decode(buf)
                    except ValueError:
                        break  # Incomplete: wait for more.
                    raw, buf = buf[:end], buf[end:]
                    self.sent.append(message)
                    if self.command is not None and message.get("execute") == self.command:
                        self.seen.set()
                        if self.cut:
                            self.drop()
                            return
                        hold.clear()
                        threading.Timer(self.delay, hold.set).start()
                    reply = self.answer(message) if self.answer else None
                    if reply is not None:
                        if "id" in message:
                            reply = {**reply, "id": message["id"]}
                        client.sendall(json.dumps(reply).encode() + b"\r\n")
                        continue
                    if "id" in message:
                        pending[json.dumps(message["id"])] = message
                    qemu.sendall(raw.encode())
        except OSError:
            pass
        finally:
            # Shut down before closing: a close alone would not wake the other
            # thread's recv, and QEMU would never see this session end.
            for sock in (qemu, client):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _to_client(self, qemu: socket.socket, client: socket.socket, hold: threading.Event,
                   pending: dict[str, dict]) -> None:
        decoder = json.JSONDecoder()
        buf = ""
        try:
            while data := qemu.recv(65536):
                hold.wait()
                if self.rewrite is None:
                    client.sendall(data)
                    continue
                buf += data.decode()
                while buf.strip():
                    buf = buf.lstrip()
                    try:
                        message, end = decoder.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    request = pending.pop(json.dumps(message.get("id")), None)
                    if request is not None and "return" in message:
                        message = self.rewrite(request, message)
                    client.sendall(json.dumps(message).encode() + b"\r\n")
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self._server.close()
        if self._park is not None:
            self._park.close()
        self.drop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "QMPProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listener(path: Path) -> int:
    """The inode of the socket listening at ``path``, from ``/proc/net/unix``."""
    with open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return int(fields[6])
    raise LookupError(f"no socket listens at {path}")


def _fd_of(pid: int, inode: int) -> int:
    """The number of process ``pid``'s descriptor on socket ``inode``."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == f"socket:[{inode}]":
                return int(name)
    raise LookupError(f"PID {pid} holds no descriptor on socket {inode}")
