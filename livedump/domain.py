"""A libvirt domain: found by name, paused and resumed by libvirt, its monitor reached
through libvirt.

libvirt owns the QMP monitor of the VMs it runs (QEMU gets it as a file
descriptor), so a second client gets no greeting. Everything livedump needs
from the monitor goes through libvirt's QEMU monitor pass-through instead,
and the pause goes through libvirt's own suspend and resume, so that libvirt
(and its other clients, who get the lifecycle events) knows the VM's state
at every moment. Memory is read from the QEMU process as in every other mode:
livedump must run on the VM's host.

libvirt's Python binding is an optional dependency (``livedump[libvirt]``),
imported only when a domain is named.
"""

import json
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TypeVar

from . import signals
from .errors import (DomainNotRunning, MonitorError, MonitorUnavailable, PermissionDenied,
                     ProcessNotFound)
from .target import is_qemu

DEFAULT_URI = "qemu:///system"

T = TypeVar("T")


def default_uri() -> str:
    """The URI virsh would use without ``--connect``, else the system instance."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def _binding() -> ModuleType:
    try:
        import libvirt
    except ImportError:
        raise MonitorUnavailable(
            "--domain needs libvirt's Python binding: pip install 'livedump[libvirt]' "
            "(it builds against libvirt-dev, with pkg-config, gcc and python3-dev)"
        ) from None
    # By default libvirt also prints every error to standard error; we report our own.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


class Domain:
    """A running libvirt domain, the QEMU process that runs it, and libvirt's controls.

    ``running``/``stop``/``cont`` are what :func:`livedump.attach.paused`
    asks of anything that can pause a VM; here they are libvirt's domain
    state, ``suspend`` and ``resume``.
    """

    def __init__(self, name: str, uri: str) -> None:
        self.libvirt = _binding()
        self.name = name
        self.uri = uri
        self._conn = _connect(self.libvirt, uri)
        try:
            self._dom = self._lookup()
            if not self._call("read the domain's state", self._dom.isActive):
                raise DomainNotRunning(f"domain {name!r} at {uri} is not running: there is "
                                       "no QEMU process to dump")
            self.uuid: str = self._dom.UUIDString()
            self.pid = qemu_pid(self.uuid, name)
        except BaseException:
            self.close()
            raise

    def _lookup(self) -> object:
        with signals.deferred():
            try:
                return self._conn.lookupByName(self.name)
            except self.libvirt.libvirtError as e:
                if e.get_error_code() != self.libvirt.VIR_ERR_NO_DOMAIN:
                    raise _error(self.libvirt, e, f"libvirt could not look up domain "
                                 f"{self.name!r} at {self.uri}: {_message(e)}") from None
        raise ProcessNotFound(f"no domain {self.name!r} at {self.uri}")

    def running(self) -> bool:
        """Whether the guest's vCPUs run, as libvirt sees it (paused, crashed: not)."""
        state, _reason = self._call("read the domain's state", self._dom.state)
        return state in (self.libvirt.VIR_DOMAIN_RUNNING, self.libvirt.VIR_DOMAIN_BLOCKED,
                         self.libvirt.VIR_DOMAIN_SHUTDOWN)

    def stop(self) -> None:
        self._call("suspend the domain", self._dom.suspend)

    def cont(self) -> None:
        self._call("resume the domain", self._dom.resume)

    def dump_memory_only(self, path: str) -> None:
        """libvirt's own memory-only dump (``virsh dump --memory-only``) into ``path``."""
        self._call("dump the domain", self._dom.coreDumpWithFormat, path,
                   self.libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, self.libvirt.VIR_DUMP_MEMORY_ONLY)

    def monitor_command(self, command: str) -> str:
        """Send one QMP command (JSON) through libvirt's pass-through; QEMU's JSON reply."""
        import libvirt_qemu

        return self._call("pass a command to QEMU's monitor", libvirt_qemu.qemuMonitorCommand,
                          self._dom, command, 0)

    def _call(self, what: str, function: Callable[..., T], *args: object) -> T:
        """Call libvirt, with signals held off so no call is torn in half; its errors
        become livedump's."""
        with signals.deferred():
            try:
                return function(*args)
            except self.libvirt.libvirtError as e:
                raise _error(self.libvirt, e, f"libvirt could not {what} "
                             f"({self.name} at {self.uri}): {_message(e)}") from None

    def close(self) -> None:
        with signals.deferred():
            try:
                self._conn.close()
            except self.libvirt.libvirtError:
                pass  # libvirtd went away: the connection is gone anyway.


class PassThrough:
    """A :class:`~livedump.monitor.Transport` through libvirt's QEMU monitor pass-through.

    libvirt marks the domain "tainted: custom-monitor" on the first command.
    No file descriptor can be passed this way; the timeout is libvirt's own.
    """

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                timeout: float | None = None) -> object:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        text = self.domain.monitor_command(json.dumps(request))
        try:
            reply = json.loads(text)
        except ValueError:
            raise MonitorError(f"unparseable reply to {command!r} through libvirt: "
                               f"{text[:200]!r}") from None
        if isinstance(reply, dict) and "return" in reply:
            return reply["return"]
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            raise MonitorError(f"QEMU refused {command!r}: {reply['error'].get('desc')}")
        raise MonitorError(f"unexpected reply to {command!r} through libvirt: {text[:200]!r}")

    def send_fd(self, fd: int) -> None:
        raise MonitorError("libvirt's monitor pass-through cannot pass a file to QEMU")

    def close(self) -> None:
        self.domain.close()


def qemu_pid(uuid: str, name: str) -> int:
    """The QEMU process on this host that runs the domain: libvirt gives every QEMU
    ``-uuid`` of its domain, which no other VM shares."""
    found = [pid for pid in _processes() if _has_uuid(pid, uuid) and is_qemu(pid)]
    if len(found) != 1:
        where = ("several QEMU processes claim it: " + ", ".join(map(str, found)) if found
                 else "no QEMU process on this host runs it (livedump must run on the VM's host)")
        raise ProcessNotFound(f"domain {name!r} (UUID {uuid}): {where}")
    return found[0]


def _processes() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _has_uuid(pid: int, uuid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False  # Gone, or not ours to read: not a QEMU we could dump anyway.
    wanted = uuid.encode()
    return any(a == b"-uuid" and v.lower() == wanted for a, v in zip(argv, argv[1:]))


def resume_if_paused(uri: str, uuid: str) -> bool:
    """Resume the domain if libvirt has it paused (for the guardian); whether it now runs."""
    libvirt = _binding()
    try:
        conn = libvirt.open(uri)
        try:
            dom = conn.lookupByUUIDString(uuid)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            return dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        finally:
            conn.close()
    except libvirt.libvirtError:
        return False


def _connect(libvirt: ModuleType, uri: str) -> object:
    with signals.deferred():
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise _error(libvirt, e, f"cannot reach libvirt at {uri}: {_message(e)}") from None


def _error(libvirt: ModuleType, e: Exception, message: str) -> Exception:
    """The livedump error for a libvirt one: which exit code it deserves."""
    code = e.get_error_code()  # type: ignore[attr-defined]
    if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED,
                libvirt.VIR_ERR_ACCESS_DENIED) or "Permission denied" in message:
        return PermissionDenied(message)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_RPC):
        return MonitorUnavailable(message)
    return MonitorError(message)


def _message(e: Exception) -> str:
    """libvirt's own message, on one line."""
    text = e.get_error_message() or str(e)  # type: ignore[attr-defined]
    return " ".join(text.split())
