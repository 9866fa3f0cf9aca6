"""The errors livedump reports, one class per exit code.

Every failure a user can cause or meet ends as one of these: the command
line prints ``livedump: <message>`` and exits with the class's code, so
scripts can tell "wrong PID" from "disk full" without parsing text.
"""


class LivedumpError(Exception):
    """Base of every expected failure; the message is one line for the user."""

    exit_code = 1
    # What the exit code means, in a few words (the docstring says more).
    meaning = "internal error (a bug: please report it)"


class UsageError(LivedumpError):
    """The command line asks for something that cannot work."""

    exit_code = 2
    meaning = "usage: bad arguments, or arguments that contradict each other"


class ProcessNotFound(LivedumpError):
    """No process with the given PID (or behind the given socket)."""

    exit_code = 3
    meaning = "no such process or libvirt domain, or QEMU exited during the dump"


class NotQemu(LivedumpError):
    """The process exists but is not a QEMU system emulator."""

    exit_code = 4
    meaning = "not a QEMU system emulator, or a monitor QEMU does not serve"


class MonitorUnavailable(LivedumpError):
    """No QMP monitor of the VM could be reached."""

    exit_code = 5
    meaning = "no QMP monitor (or libvirt) reachable"


class PermissionDenied(LivedumpError):
    """The OS refused access to the VM's memory or monitor."""

    exit_code = 6
    meaning = "permission denied (the VM's memory, mappings or monitor)"


class OutputExists(LivedumpError):
    """The output path exists and ``--force`` was not given."""

    exit_code = 7
    meaning = "the output exists (use --force), or is no file --force may replace"


class DumpIOError(LivedumpError):
    """Reading guest memory or writing the vmcore failed."""

    exit_code = 8
    meaning = "I/O error reading guest memory or writing the vmcore"


class MonitorError(LivedumpError):
    """The monitor refused a command or answered something unparseable."""

    exit_code = 9
    meaning = "the monitor refused a command or answered something unparseable"


class GuestMemoryError(LivedumpError):
    """The guest RAM map does not fit the QEMU process's address space."""

    exit_code = 10
    meaning = "the RAM map does not fit QEMU's mappings or RAM blocks"


class DebugInfoError(LivedumpError):
    """QEMU's debug info is missing, does not match the running binary, or lacks what we need."""

    exit_code = 11
    meaning = "no usable debug info for QEMU (ptrace mode)"


class AlreadyDumping(LivedumpError):
    """Another livedump is dumping the same VM right now."""

    exit_code = 12
    meaning = "another livedump is dumping this VM"


class FreezeError(LivedumpError):
    """A QEMU thread would not stop in time under ptrace, or could not be let go."""

    exit_code = 13
    meaning = "a QEMU thread would not stop under ptrace, or could not be let go"


class DomainNotRunning(LivedumpError):
    """The libvirt domain exists but is not running: no QEMU process holds its memory."""

    exit_code = 14
    meaning = "the libvirt domain is not running"


class SnapshotError(LivedumpError):
    """``--live``: QEMU cannot take a background snapshot of this VM, or the one
    it took failed or came in a form livedump does not read."""

    exit_code = 15
    meaning = "--live: QEMU cannot take a background snapshot, or it failed"


class GuestKernelError(LivedumpError):
    """The guest's kernel log cannot be read: no VMCOREINFO in its memory (not a
    booted Linux guest), a kernel or target livedump cannot read, or a log
    that kept changing under every read."""

    exit_code = 17
    meaning = "the guest kernel's log cannot be read (no Linux VMCOREINFO, or unsupported)"


class CoreFileError(LivedumpError):
    """``--core``: the file is not a process's core file, or is cut short."""

    exit_code = 18
    meaning = "--core: not a core file, or a truncated one"


class NoGuestRam(LivedumpError):
    """``--core``: the core holds QEMU's structures but not the guest's RAM
    (QEMU ran with ``-machine dump-guest-core=off``)."""

    exit_code = 19
    meaning = "--core: the core holds none of the guest's RAM (dump-guest-core=off)"


def exit_codes() -> list[tuple[int, str]]:
    """Every exit code and what it means, for ``--help`` and the README's table."""
    found: dict[int, str] = {0: "vmcore written"}
    pending: list[type[LivedumpError]] = [LivedumpError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.exit_code, cls.meaning)
        pending.extend(cls.__subclasses__())
    found[GuardianLost.code] = GuardianLost.meaning
    return sorted(found.items())


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

    code = 16
    meaning = "livedump's guardian could not be started, or died and none could replace it"

    def __init__(self, message: str) -> None:
        BaseException.__init__(self, message)
        self.exit_code = self.code
