"""Reading ``/proc`` about another process, with livedump's errors.

Every look at QEMU through ``/proc`` fails the same two ways: the process
is gone (ProcessNotFound) or not ours to look at (PermissionDenied). Each
function here says so in one line naming what was asked for, so callers
need no ``try`` of their own; the ``*_or_none`` ones are for processes
that are only candidates (another user's, or gone by now) and answer None.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from livedump.errors import PermissionDenied, ProcessNotFound

# Process flag PF_EXITING, in field 9 of /proc/PID/stat: exit has begun.
_PF_EXITING = 0x4


# Reading memory or the page map takes ptrace's attach rights, which Yama restricts.
_ATTACH = ("mem", "pagemap")


@contextmanager
def _errors(pid: int, name: str, what: str) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessNotFound(f"no process with PID {pid}") from None
    except PermissionError:
        hint = "; check kernel.yama.ptrace_scope" if name in _ATTACH else ""
        raise PermissionDenied(f"may not {what} PID {pid} (run as its owner or root{hint})"
                               ) from None


def path(pid: int, name: str) -> str:
    return f"/proc/{pid}/{name}"


def read_text(pid: int, name: str, what: str) -> str:
    """``/proc/PID/NAME`` as text; ``what`` says in errors what was refused
    ("read the mappings of")."""
    with _errors(pid, name, what), open(path(pid, name)) as f:
        return f.read()


def readlink(pid: int, name: str, what: str) -> str:
    """Where the link ``/proc/PID/NAME`` points (``exe``, ``cwd``, ``fd/N``)."""
    with _errors(pid, name, what):
        return os.readlink(path(pid, name))


def open_fd(pid: int, name: str, what: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor on ``/proc/PID/NAME`` (close-on-exec), for reads at offsets."""
    with _errors(pid, name, what):
        return os.open(path(pid, name), flags | os.O_CLOEXEC)


def cmdline(pid: int) -> list[str]:
    """The process's arguments (undecodable bytes kept as surrogates)."""
    with _errors(pid, "cmdline", "inspect"), open(path(pid, "cmdline"), "rb") as f:
        return _split_cmdline(f.read())


def cmdline_or_none(pid: int) -> list[str] | None:
    """The arguments of a process that may be gone or another user's: None then."""
    try:
        with open(path(pid, "cmdline"), "rb") as f:
            return _split_cmdline(f.read())
    except OSError:
        return None


def _split_cmdline(raw: bytes) -> list[str]:
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def stat_fields(pid: int, task: int | None = None) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` (or of a thread's) after the command name,
    which may hold spaces and parentheses: field 3 (state) is ``[0]``. None if gone."""
    name = "stat" if task is None else f"task/{task}/stat"
    try:
        with open(path(pid, name)) as f:
            return f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def start_time(pid: int) -> int:
    """When the process started, in clock ticks since boot: with the PID, its identity."""
    fields = stat_fields(pid)
    if fields is None:
        raise ProcessNotFound(f"no process with PID {pid}")
    return int(fields[19])


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs: not gone, not a zombie, not on its way out."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X") \
        and not int(fields[6]) & _PF_EXITING


def pids() -> list[int]:
    """Every process on the host, as this PID namespace sees them."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
