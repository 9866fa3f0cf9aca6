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

import contextlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from livedump import proc, signals
from livedump.errors import (
    DomainNotRunning,
    LivedumpError,
    MonitorError,
    MonitorUnavailable,
    PermissionDenied,
    ProcessNotFound,
)
from livedump.qmp.transport import RESUME_TIMEOUT
from livedump.vm.process import is_qemu

DEFAULT_URI = "qemu:///system"
CONNECT_TIMEOUT = 60.0  # A libvirtd that has just started probes every QEMU first.

T = TypeVar("T")

# libvirt's binding ships no type information: what livedump uses of it is
# declared here, so that mypy checks the calls.

if TYPE_CHECKING:
    class _LibvirtError(Exception):
        """libvirt.libvirtError."""

        def get_error_code(self) -> int | None:
            raise NotImplementedError

        def get_error_message(self) -> str | None:
            raise NotImplementedError


class _VirDomain(Protocol):
    """libvirt.virDomain."""

    def isActive(self) -> int: ...
    def UUIDString(self) -> str: ...
    def state(self) -> list[int]: ...  # [state, reason]
    def suspend(self) -> int: ...
    def resume(self) -> int: ...
    def coreDumpWithFormat(self, to: str, dumpformat: int, flags: int) -> int: ...


class _VirConnect(Protocol):
    """libvirt.virConnect."""

    def lookupByName(self, name: str) -> _VirDomain: ...
    def lookupByUUIDString(self, uuidstr: str) -> _VirDomain: ...
    def close(self) -> int: ...


class _Libvirt(Protocol):
    """The libvirt module."""

    libvirtError: type["_LibvirtError"]
    VIR_DOMAIN_RUNNING: int
    VIR_DOMAIN_BLOCKED: int
    VIR_DOMAIN_PAUSED: int
    VIR_DOMAIN_SHUTDOWN: int
    VIR_DOMAIN_CORE_DUMP_FORMAT_RAW: int
    VIR_DUMP_MEMORY_ONLY: int
    VIR_ERR_NO_DOMAIN: int
    VIR_ERR_AUTH_FAILED: int
    VIR_ERR_AUTH_CANCELLED: int
    VIR_ERR_AUTH_UNAVAILABLE: int
    VIR_ERR_ACCESS_DENIED: int
    VIR_ERR_NO_CONNECT: int
    VIR_ERR_SYSTEM_ERROR: int
    VIR_ERR_OPERATION_TIMEOUT: int
    VIR_ERR_RPC: int

    def open(self, name: str) -> _VirConnect: ...
    def registerErrorHandler(self, f: Callable[[None, object], None], ctx: None) -> int: ...


def default_uri() -> str:
    """The URI virsh would use without ``--connect``, else the system instance."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def _binding() -> _Libvirt:
    try:
        import libvirt
    except ImportError:
        raise MonitorUnavailable(
            "--domain needs libvirt's Python binding, livedump's [libvirt] extra: pip "
            "install libvirt-python (it builds against libvirt-dev, with pkg-config, gcc "
            "and python3-dev)"
        ) from None
    # By default libvirt also prints every error to standard error; we report our own.
    binding: _Libvirt = libvirt
    binding.registerErrorHandler(lambda _ctx, _err: None, None)
    return binding


class Domain:
    """A running libvirt domain, the QEMU process that runs it, and libvirt's controls.

    ``running``/``stop``/``cont`` are what :func:`livedump.vm.pause.paused`
    asks of anything that can pause a VM; here they are libvirt's domain
    state, ``suspend`` and ``resume``.

    libvirt's calls have no deadline of their own (a command to a hung QEMU
    waits for ever), so each runs in a thread for at most ``timeout`` seconds
    (longer for the connection and the resume), while signals wait in the
    main thread: none is torn in half, none blocks livedump for ever.
    """

    def __init__(self, name: str, uri: str, timeout: float) -> None:
        self.libvirt = _binding()
        self.name = name
        self.uri = uri
        self.timeout = timeout
        conn = self._call(f"connect to {uri}", self.libvirt.open, uri,
                          timeout=CONNECT_TIMEOUT, failure=MonitorUnavailable)
        self._conn: _VirConnect | None = conn  # None once closed
        try:
            self._dom = self._lookup(conn)
            if not self._call(f"read the state of domain {name}", self._dom.isActive):
                raise DomainNotRunning(f"domain {name!r} at {uri} is not running: there is "
                                       "no QEMU process to dump")
            self.uuid: str = self._dom.UUIDString()
            self.pid = qemu_pid(self.uuid, name)
        except BaseException:
            self.close()
            raise

    def _lookup(self, conn: _VirConnect) -> _VirDomain:
        try:
            return self._call(f"look up domain {self.name} at {self.uri}",
                              conn.lookupByName, self.name, timeout=CONNECT_TIMEOUT)
        except ProcessNotFound:
            raise ProcessNotFound(f"no domain {self.name!r} at {self.uri}") from None

    def running(self) -> bool:
        """Whether the guest's vCPUs run, as libvirt sees it (paused, crashed: not)."""
        state, _reason = self._call(f"read the state of domain {self.name}", self._dom.state)
        return state in (self.libvirt.VIR_DOMAIN_RUNNING, self.libvirt.VIR_DOMAIN_BLOCKED,
                         self.libvirt.VIR_DOMAIN_SHUTDOWN)

    def stop(self) -> None:
        self._call(f"suspend domain {self.name}", self._dom.suspend)

    def cont(self) -> None:
        self._call(f"resume domain {self.name}", self._dom.resume, timeout=RESUME_TIMEOUT)

    def dump_memory_only(self, path: str) -> None:
        """libvirt's own memory-only dump (``virsh dump --memory-only``) into ``path``,
        which had better be a pipe: the dump lasts as long as its reader lets it."""
        self._call(f"dump domain {self.name}", self._dom.coreDumpWithFormat, path,
                   self.libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                   self.libvirt.VIR_DUMP_MEMORY_ONLY, timeout=CONNECT_TIMEOUT)

    def monitor_command(self, command: str) -> str:
        """Send one QMP command (JSON) through libvirt's pass-through; QEMU's JSON reply."""
        import libvirt_qemu

        send: Callable[[_VirDomain, str, int], str] = libvirt_qemu.qemuMonitorCommand
        return self._call(f"pass a command to the monitor of domain {self.name}",
                          send, self._dom, command, 0)

    def _call(self, what: str, function: Callable[..., T], *args: object,
              timeout: float | None = None,
              failure: type[LivedumpError] = MonitorError) -> T:
        """``function(*args)`` within ``timeout`` (default: the domain's); libvirt's
        errors become livedump's (``failure`` where no other fits)."""
        timeout = timeout or self.timeout
        try:
            with signals.deferred():
                return _within(timeout, function, *args)
        except self.libvirt.libvirtError as e:
            raise _error(self.libvirt, e, f"libvirt could not {what}: {_message(e)}",
                         failure) from None
        except TimeoutError:
            raise MonitorUnavailable(f"libvirt could not {what}: no answer within {timeout:g} s"
                                     ) from None

    def close(self) -> None:
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            with contextlib.suppress(LivedumpError):
                # libvirtd gone or hung: the connection goes with this process anyway.
                self._call("close its connection", conn.close)


def _within(timeout: float, function: Callable[..., T], *args: object) -> T:
    """``function(*args)``, run in a thread; TimeoutError if it has not returned in time
    (the thread is left to finish or to end with the process)."""
    outcome: list[tuple[T] | BaseException] = []  # the value (in a tuple), or what it raised

    def run() -> None:
        try:
            outcome.append((function(*args),))
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run, name="livedump-libvirt", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise TimeoutError
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0][0]


class PassThrough:
    """A :class:`~livedump.qmp.transport.Transport` through libvirt's QEMU monitor pass-through.

    libvirt marks the domain "tainted: custom-monitor" on the first command.
    No file descriptor can be passed this way, and each command waits as long
    as the domain's calls do (``timeout`` is not used).
    """

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                timeout: float | None = None) -> object:
        if _dumps(command, arguments):
            raise MonitorError("QEMU's dump-guest-memory is never sent through libvirt: "
                               "libvirt 9.0's daemon crashes when a dump it did not start ends")
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


def _dumps(command: str, arguments: Mapping[str, object] | None) -> bool:
    """Whether a command would start a QEMU dump (QMP, or HMP through QMP)."""
    if command == "human-monitor-command":
        command = str((arguments or {}).get("command-line", ""))
    return command.split(maxsplit=1)[:1] == ["dump-guest-memory"]


def qemu_pid(uuid: str, name: str) -> int:
    """The QEMU process on this host that runs the domain: libvirt gives every QEMU
    ``-uuid`` of its domain, which no other VM shares."""
    found = [pid for pid in proc.pids() if _has_uuid(pid, uuid) and is_qemu(pid)]
    if len(found) != 1:
        where = ("several QEMU processes claim it: " + ", ".join(map(str, found)) if found
                 else "no QEMU process on this host runs it (livedump must run on the VM's host)")
        raise ProcessNotFound(f"domain {name!r} (UUID {uuid}): {where}")
    return found[0]


def _has_uuid(pid: int, uuid: str) -> bool:
    argv = proc.cmdline_or_none(pid)
    if argv is None:
        return False  # Gone, or not ours to read: not a QEMU we could dump anyway.
    return any(a == "-uuid" and v.lower() == uuid for a, v in itertools.pairwise(argv))


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


def _error(libvirt: _Libvirt, e: "_LibvirtError", message: str,
           failure: type[LivedumpError]) -> LivedumpError:
    """The livedump error for a libvirt one: which exit code it deserves."""
    code = e.get_error_code()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return ProcessNotFound(message)
    if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED,
                libvirt.VIR_ERR_AUTH_UNAVAILABLE, libvirt.VIR_ERR_ACCESS_DENIED
                ) or "Permission denied" in message:
        return PermissionDenied(message)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_RPC):
        return MonitorUnavailable(message)
    return failure(message)


def _message(e: "_LibvirtError") -> str:
    """libvirt's own message, on one line."""
    text = e.get_error_message() or str(e)
    return " ".join(text.split())
