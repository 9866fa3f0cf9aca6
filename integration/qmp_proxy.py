"""A QMP relay that misbehaves on cue, for fault-injection tests.

It sits between livedump and QEMU's monitor socket and passes everything
through, except that it can hold back QEMU's greeting, hold back QEMU's
reply to a chosen command, cut the connection when that command is sent,
or drop the connection at any moment (:meth:`drop`). ``seen`` fires when
the chosen command goes by, so a test can act at exactly that moment.
Each new client gets a new session with QEMU, as with QEMU itself.
"""

import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path


class QMPProxy:
    def __init__(self, upstream: Path, command: str | None = None, *, delay: float = 0.0,
                 cut: bool = False, greeting_delay: float = 0.0) -> None:
        self.upstream = upstream
        self.command = command
        self.delay = delay
        self.cut = cut
        self.greeting_delay = greeting_delay
        self.seen = threading.Event()
        self.connections = 0
        self.sent: list[dict] = []  # every message the client sent, in order
        self._current: list[socket.socket] = []
        self.dir = tempfile.mkdtemp(prefix="livedump-proxy-")
        self.path = Path(self.dir) / "proxy.sock"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self) -> None:
        """Cut the current connection, both ways, now."""
        for s in self._current:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
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
        threading.Thread(target=self._to_client, args=(qemu, client, hold), daemon=True).start()
        decoder = json.JSONDecoder()
        buf = ""
        try:
            while data := client.recv(65536):
                buf += data.decode()
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

    @staticmethod
    def _to_client(qemu: socket.socket, client: socket.socket, hold: threading.Event) -> None:
        try:
            while data := qemu.recv(65536):
                hold.wait()
                client.sendall(data)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._server.close()
        self.drop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "QMPProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

