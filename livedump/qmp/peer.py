"""Which processes are at the other end of a local socket.

livedump believes what the monitor says about where guest RAM lies and
whether the guest is paused, so the monitor must be QEMU itself: a relay
(socat, a proxy) could answer anything. For a UNIX socket the kernel says
who listens (SO_PEERCRED: the process that called listen(), as only that
process or one able to take its descriptors can accept there). For TCP,
the connection's other end is found in ``/proc/net/tcp`` and ``tcp6`` by
its addresses, and the processes holding that socket by its inode among
their descriptors in ``/proc/*/fd``.
"""

import contextlib
import ipaddress
import os
import socket
import struct

from livedump import proc
from livedump.errors import NotQemu, UsageError
from livedump.vm.process import is_qemu, qemu_executable

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Endpoint = tuple[_IP, int]


def serving(sock: socket.socket, where: str, expected: int | None) -> int:
    """The QEMU process at the other end of ``sock`` (the monitor at ``where``):
    ``expected`` if given, else the one process found there; any other is refused."""
    found = owners(sock, expected)
    if expected is not None and expected in found:
        return expected
    if len(found) > 1:
        raise UsageError(f"{where} is held by several processes (PIDs "
                         f"{', '.join(map(str, sorted(found)))}); name QEMU with --pid")
    if not found:
        raise NotQemu(f"no process that livedump may inspect serves {where}, "
                      "so it is not the monitor of a QEMU it can dump")
    pid = found.pop()
    if expected is None:
        with contextlib.suppress(NotQemu):
            qemu_executable(pid)
            return pid
    elif is_qemu(pid):
        raise UsageError(f"{where} belongs to QEMU PID {pid}, not to PID {expected}")
    wanted = "QEMU" if expected is None else f"QEMU PID {expected}"
    raise NotQemu(f"{where} is served by PID {pid} ({_executable(pid)}), not by {wanted}: "
                  "livedump talks only to QEMU's own monitor")


def owners(sock: socket.socket, expected: int | None = None) -> set[int]:
    """The PIDs of the processes at the other end of the connected ``sock``.

    Empty if none can be told (a TCP peer on another machine, or one whose
    descriptors we may not read). With ``expected``, that process is looked
    at first and, if it holds the other end, is the answer.
    """
    if sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        return {pid} if pid > 0 else set()
    inode = tcp_inode(_endpoint(sock.getpeername()), _endpoint(sock.getsockname()))
    if inode is None:
        return set()
    link = f"socket:[{inode}]"
    if expected is not None and _holds(expected, link):
        return {expected}
    return {pid for pid in proc.pids() if _holds(pid, link)}


def tcp_inode(local: _Endpoint, remote: _Endpoint) -> int | None:
    """The inode of this machine's TCP socket from ``local`` to ``remote``, if any.

    None also for a connection not yet accepted (its inode is 0 until then).
    """
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:  # No IPv6 in this kernel.
            continue
        for line in lines:
            fields = line.split()
            if (_parse(fields[1]), _parse(fields[2])) == (local, remote):
                return int(fields[9]) or None
    return None


def _parse(text: str) -> _Endpoint:
    """An address as ``/proc/net/tcp*`` shows it: 32-bit words in hex, each in host order."""
    address, _, port = text.partition(":")
    raw = b"".join(struct.pack("=I", int(address[i : i + 8], 16))
                   for i in range(0, len(address), 8))
    return _normal(ipaddress.ip_address(raw)), int(port, 16)


def _endpoint(address: tuple[object, ...]) -> _Endpoint:
    """``getsockname()``'s (host, port, ...) in the form :func:`_parse` gives."""
    host = str(address[0]).partition("%")[0]  # Without a link-local scope.
    return _normal(ipaddress.ip_address(host)), int(str(address[1]))


def _normal(ip: _IP) -> _IP:
    """An IPv4 address seen through an IPv6 socket (::ffff:a.b.c.d) as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "executable unknown"


def _holds(pid: int, link: str) -> bool:
    """Whether process ``pid`` has a descriptor on ``link`` (``socket:[INODE]``)."""
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:  # Gone, or not ours to look at.
        return False
    for name in names:
        try:
            if os.readlink(f"{directory}/{name}") == link:
                return True
        except OSError:
            continue
    return False
