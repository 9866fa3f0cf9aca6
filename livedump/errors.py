"""The errors livedump reports, one class per exit code.

Every failure a user can cause or meet ends as one of these: the command
line prints ``livedump: <message>`` and exits with the class's code, so
scripts can tell "wrong PID" from "disk full" without parsing text.
"""


class LivedumpError(Exception):
    """Base of every expected failure; the message is one line for the user."""

    exit_code = 1


class UsageError(LivedumpError):
    """The command line asks for something that cannot work."""

    exit_code = 2


class ProcessNotFound(LivedumpError):
    """No process with the given PID (or behind the given socket)."""

    exit_code = 3


class NotQemu(LivedumpError):
    """The process exists but is not a QEMU system emulator."""

    exit_code = 4


class MonitorUnavailable(LivedumpError):
    """No QMP monitor of the VM could be reached."""

    exit_code = 5


class PermissionDenied(LivedumpError):
    """The OS refused access to the VM's memory or monitor."""

    exit_code = 6


class OutputExists(LivedumpError):
    """The output path exists and ``--force`` was not given."""

    exit_code = 7


class DumpIOError(LivedumpError):
    """Reading guest memory or writing the vmcore failed."""

    exit_code = 8


class MonitorError(LivedumpError):
    """The monitor refused a command or answered something unparseable."""

    exit_code = 9


class GuestMemoryError(LivedumpError):
    """The guest RAM map does not fit the QEMU process's address space."""

    exit_code = 10


class DebugInfoError(LivedumpError):
    """QEMU's debug info is missing, does not match the running binary, or lacks what we need."""

    exit_code = 11


class AlreadyDumping(LivedumpError):
    """Another livedump is dumping the same VM right now."""

    exit_code = 12


class FreezeError(LivedumpError):
    """A QEMU thread would not stop in time under ptrace, or could not be let go."""

    exit_code = 13


class DomainNotRunning(LivedumpError):
    """The libvirt domain exists but is not running: no QEMU process holds its memory."""

    exit_code = 14


class SnapshotError(LivedumpError):
    """``--live``: QEMU cannot take a background snapshot of this VM, or the one
    it took failed or came in a form livedump does not read."""

    exit_code = 15


class Interrupted(BaseException):
    """A signal ended the dump; exits 128 + the signal number, as shells do.

    Like KeyboardInterrupt, not an Exception: it can be raised at almost any
    line of the main thread, also inside libraries, and no ``except
    Exception`` (nor ``except LivedumpError``) may take it for a failure to
    work around.
    """

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"interrupted by {name}")
        self.exit_code = 128 + signum


class GuardianLost(Interrupted):
    """livedump's guardian process could not be started, or died and no new one
    could be: livedump stops, the guest resumed on its way out. Raised like a
    signal's :class:`Interrupted`, in the main thread, by the thread that
    watches the guardian."""

    def __init__(self, message: str) -> None:
        BaseException.__init__(self, message)
        self.exit_code = 16
