"""One livedump per VM at a time.

A second run against the same QEMU would fight the first over its monitor
and its pause. Each run holds a listening socket in the abstract UNIX
namespace, named after the QEMU process (PID and start time, so a reused
PID is another name); the kernel releases it however livedump ends, even
by SIGKILL, and a second run can ask it who holds it.
"""

import socket
import struct

from .errors import AlreadyDumping, ProcessNotFound


class VMLock:
    """Held while this process dumps the VM of QEMU process ``pid``."""

    def __init__(self, pid: int) -> None:
        self.name = b"\0livedump-" + _identity(pid).encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.name)
            self._sock.listen(1)
        except OSError:
            self._sock.close()
            raise AlreadyDumping(
                f"another livedump{_holder(self.name)} is dumping QEMU PID {pid}"
            ) from None

    def release(self) -> None:
        self._sock.close()

    def __enter__(self) -> "VMLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _identity(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22, after the parenthesised command name, which may hold spaces.
            start_time = f.read().rpartition(")")[2].split()[19]
    except FileNotFoundError:
        raise ProcessNotFound(f"no process with PID {pid}") from None
    return f"{pid}-{start_time}"


def _holder(name: bytes) -> str:
    """" (PID n)" for the process holding the lock, where it can be told."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.settimeout(1)
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return ""
    return f" (PID {struct.unpack('3i', creds)[0]})"
