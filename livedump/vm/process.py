"""Find the VM: check that a PID is QEMU, and where its QMP monitors listen.

The monitor addresses come from QEMU's own command line, as the user or
libvirt wrote it: ``-qmp unix:PATH,...``, ``-qmp tcp:HOST:PORT,...``, and
``-chardev socket,id=X,...`` joined to ``-mon chardev=X,mode=control``, also
where these two are sections of a ``-readconfig`` file.
"""

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from livedump import proc
from livedump.errors import NotQemu, PermissionDenied, ProcessNotFound

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
    """The QMP monitors a QEMU command line sets up, in QEMU's order; relative
    paths (of sockets and of ``-readconfig`` files) are taken from ``cwd``."""
    chardevs: dict[str, tuple[dict[str, str], str]] = {}  # id: properties, origin
    monitors: list[QmpEndpoint | dict[str, str]] = []  # an endpoint, or a -mon's properties
    for found in _monitor_options(argv, cwd):
        if isinstance(found, QmpEndpoint):
            monitors.append(found)
            continue
        group, props, origin = found
        if group == "mon":
            monitors.append(props)
        elif "id" in props:
            chardevs[props["id"]] = props, origin

    endpoints = []
    for monitor in monitors:
        if isinstance(monitor, QmpEndpoint):
            endpoints.append(monitor)
        elif monitor.get("mode") == "control" and monitor.get("chardev") in chardevs:
            cprops, origin = chardevs[monitor["chardev"]]
            if cprops.get("backend") == "socket":
                endpoints.append(_socket_endpoint(cprops, cwd, origin))
    return endpoints


def _monitor_options(argv: list[str], cwd: str
                     ) -> Iterator[QmpEndpoint | tuple[str, dict[str, str], str]]:
    """What can make a QMP monitor, in order: each ``-qmp``'s endpoint, and
    (group, properties, origin) for each chardev and monitor of the command
    line and of its ``-readconfig`` files; an endpoint for a file that
    cannot be read, with no address (QEMU read it, so it may name one)."""
    for name, value in _options(argv):
        if name in ("qmp", "qmp-pretty"):
            yield _legacy_endpoint(value, cwd, f"-{name} {value}")
        elif name in ("chardev", "mon"):
            first, props = _split_props(value)
            # An unnamed first property: a chardev's backend, a monitor's chardev.
            props.setdefault("backend" if name == "chardev" else "chardev", first)
            yield name, props, f"-{name} id={props.get('id', '')}"
        elif name == "readconfig":
            try:
                sections = parse_config(_read_config(os.path.join(cwd, value)))
            except (OSError, ValueError) as e:
                reason = e.strerror if isinstance(e, OSError) else str(e)
                yield QmpEndpoint(None, f"-readconfig {value} (cannot read it: {reason})")
                continue
            for group, props in sections:
                if group in ("chardev", "mon"):
                    yield group, props, f'[{group} "{props.get("id", "")}"] of {value}'


_MAX_CONFIG = 1 << 20  # bytes of a -readconfig file read at most


def _read_config(path: str) -> str:
    """The text of the -readconfig file at ``path``. It may be a pipe or a
    terminal (``/dev/stdin``, ``<(...)``), which QEMU read once and which
    livedump must not wait on: only a regular file is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file; QEMU read it once")
        return f.read(_MAX_CONFIG).decode("utf-8", "surrogateescape")


# QEMU's config file syntax: '[group]' or '[group "id"]' starts a section,
# '  key = "value"' lines follow (with no escapes: a value holds no '"'),
# and a line that starts with '#' is a comment.
_SECTION = re.compile(r'\[(\S+?)(?:\s+"([^"]*)")?\]')
_VALUE = re.compile(r'\s*(\S+)\s*=\s*"([^"]*)"')


def parse_config(text: str) -> list[tuple[str, dict[str, str]]]:
    """The sections of a QEMU config file: (group, properties), with the
    section's id as the property ``id``. Lines QEMU would refuse are
    skipped: QEMU read the file when it started, and it may have changed."""
    sections: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if section := _SECTION.match(line):
            group, id_ = section.groups()
            sections.append((group, {} if id_ is None else {"id": id_}))
        elif (value := _VALUE.match(line)) and sections:
            sections[-1][1][value[1]] = value[2]
    return sections


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


def tcp_address(spec: str) -> tuple[str, int] | None:
    """``tcp:HOST:PORT`` (HOST may be ``[v6]`` or empty, for localhost) as an
    address; None if ``spec`` is not one."""
    if not spec.startswith("tcp:"):
        return None
    host, _, port = spec[4:].rpartition(":")
    if not port.isdigit():
        return None
    return (host.strip("[]") or "localhost", int(port))


def _legacy_endpoint(value: str, cwd: str, origin: str) -> QmpEndpoint:
    spec, _ = _split_props(value)
    if spec.startswith("unix:"):
        return QmpEndpoint(os.path.join(cwd, spec[5:]), origin)
    if (address := tcp_address(spec)) is not None:
        return QmpEndpoint(address, origin)
    return QmpEndpoint(None, f"{origin} (not a socket livedump can connect to)")


def _socket_endpoint(props: dict[str, str], cwd: str, origin: str) -> QmpEndpoint:
    if "path" in props:
        return QmpEndpoint(os.path.join(cwd, props["path"]), origin)
    if "port" in props and props["port"].isdigit():
        return QmpEndpoint((props.get("host") or "localhost", int(props["port"])), origin)
    if "fd" in props:
        return QmpEndpoint(None, f"{origin} (an inherited fd, as libvirt passes)")
    return QmpEndpoint(None, f"{origin} (not a socket livedump can connect to)")
