"""Find the VM: check that a PID is QEMU, and where its QMP monitors listen.

The monitor addresses come from QEMU's own command line, as the user or
libvirt wrote it: ``-qmp unix:PATH,...``, ``-qmp tcp:HOST:PORT,...``, and
``-chardev socket,id=X,...`` joined to ``-mon chardev=X,mode=control``.
"""

import os
from dataclasses import dataclass

from . import proc
from .errors import NotQemu, PermissionDenied, ProcessNotFound

Address = str | tuple[str, int]  # a monitor's UNIX socket path, or TCP (host, port)


def describe(address: Address) -> str:
    """How an address appears in messages: ``unix:PATH`` or ``tcp:HOST:PORT``."""
    if isinstance(address, str):
        return f"unix:{address}"
    return f"tcp:{address[0]}:{address[1]}"


@dataclass(frozen=True)
class QmpEndpoint:
    """A QMP monitor named on QEMU's command line.

    ``address`` is None where QEMU got an already-open file descriptor
    (libvirt does this): there is nothing we can connect to.
    """

    address: Address | None
    origin: str

    def __str__(self) -> str:
        return describe(self.address) if self.address is not None else self.origin


def qemu_executable(pid: int) -> str:
    """Return the path of process ``pid``'s executable, checking it is a QEMU system emulator."""
    exe = proc.readlink(pid, "exe", "inspect")
    name = os.path.basename(exe.removesuffix(" (deleted)"))
    if not (name.startswith("qemu-system-") or name == "qemu-kvm"):
        raise NotQemu(f"PID {pid} is {exe}, not a QEMU system emulator")
    return exe


def is_qemu(pid: int) -> bool:
    try:
        qemu_executable(pid)
    except (NotQemu, ProcessNotFound, PermissionDenied):
        return False
    return True


def qmp_endpoints(pid: int) -> list[QmpEndpoint]:
    """The QMP monitors on process ``pid``'s command line, in the order given."""
    return parse_qmp_options(proc.cmdline(pid), proc.readlink(pid, "cwd", "inspect"))


def parse_qmp_options(argv: list[str], cwd: str = "/") -> list[QmpEndpoint]:
    """The QMP monitors a QEMU command line sets up; relative paths are taken from ``cwd``."""
    options = _options(argv)
    chardevs = {}
    for name, value in options:
        if name == "chardev":
            kind, props = _split_props(value)
            if "id" in props:
                chardevs[props["id"]] = (kind, props)

    endpoints = []
    for name, value in options:
        if name in ("qmp", "qmp-pretty"):
            endpoints.append(_legacy_endpoint(value, cwd, f"-{name} {value}"))
        elif name == "mon":
            first, props = _split_props(value)
            chardev_id = props.get("chardev", first)
            if props.get("mode") != "control" or chardev_id not in chardevs:
                continue
            kind, cprops = chardevs[chardev_id]
            if kind == "socket":
                endpoints.append(_socket_endpoint(cprops, cwd, f"-chardev id={chardev_id}"))
    return endpoints


def _options(argv: list[str]) -> list[tuple[str, str]]:
    """(name, value) for each ``-name value`` pair; ``--name`` is the same option."""
    pairs = []
    for i, arg in enumerate(argv[1:-1], start=1):
        if arg.startswith("-") and len(arg) > 1:
            pairs.append((arg.lstrip("-"), argv[i + 1]))
    return pairs


def _split_props(value: str) -> tuple[str, dict[str, str]]:
    """Split QEMU's ``[first,]key=value,...`` syntax, where ``,,`` is a literal comma."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    first = "" if "=" in parts[0] else parts.pop(0)
    props = {}
    for p in parts:
        key, _, val = p.partition("=")
        props[key] = val
    return first, props


def _legacy_endpoint(value: str, cwd: str, origin: str) -> QmpEndpoint:
    spec, _ = _split_props(value)
    if spec.startswith("unix:"):
        return QmpEndpoint(os.path.join(cwd, spec[5:]), origin)
    if spec.startswith("tcp:"):
        host, _, port = spec[4:].rpartition(":")
        if port.isdigit():
            return QmpEndpoint((host.strip("[]") or "localhost", int(port)), origin)
    return QmpEndpoint(None, f"{origin} (not a socket livedump can connect to)")


def _socket_endpoint(props: dict[str, str], cwd: str, origin: str) -> QmpEndpoint:
    if "path" in props:
        return QmpEndpoint(os.path.join(cwd, props["path"]), origin)
    if "port" in props and props["port"].isdigit():
        return QmpEndpoint((props.get("host") or "localhost", int(props["port"])), origin)
    if "fd" in props:
        return QmpEndpoint(None, f"{origin} (an inherited fd, as libvirt passes)")
    return QmpEndpoint(None, f"{origin} (not a socket livedump can connect to)")
