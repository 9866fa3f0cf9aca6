"""A QMP relay that misbehaves on cue, for fault-injection tests.

It sits between livedump and QEMU's monitor socket and passes everything
through, except that it can hold back QEMU's reply to a chosen command, or
cut the connection when that command is sent. ``seen`` fires when the
command goes by, so a test can act at exactly that moment.
"""

import json
import os
import socket
import tempfile
import threading
from pathlib import Path


class QMPProxy:
    def __init__(self, upstream: Path, command: str | None = None, *,
                 delay: float = 0.0, cut: bool = False) -> None:
        self.upstream = upstream
        self.command = command
        self.delay = delay
        self.cut = cut
        self.seen = threading.Event()
        self._release = threading.Event()
        self.dir = tempfile.mkdtemp(prefix="livedump-proxy-")
        self.path = Path(self.dir) / "proxy.sock"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            client, _ = self._server.accept()
        except OSError:
            return
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu.connect(str(self.upstream))
        hold = threading.Event()
        hold.set()
        threading.Thread(target=self._to_client, args=(qemu, client, hold), daemon=True).start()
        decoder = json.JSONDecoder()
        buf = ""
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
                if self.command is not None and message.get("execute") == self.command:
                    self.seen.set()
                    if self.cut:
                        client.shutdown(socket.SHUT_RDWR)
                        qemu.close()
                        return
                    hold.clear()
                    threading.Timer(self.delay, hold.set).start()
                qemu.sendall(raw.encode())
        qemu.close()

    @staticmethod
    def _to_client(qemu: socket.socket, client: socket.socket, hold: threading.Event) -> None:
        try:
            while data := qemu.recv(65536):
                hold.wait()
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._server.close()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass

    def __enter__(self) -> "QMPProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
