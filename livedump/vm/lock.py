"""One livedump per VM at a time, and a lock only those who may dump the VM can take.

A second run against the same QEMU would fight the first over its monitor
and its pause. Each run holds an exclusive flock on QEMU's ``/proc/PID/mem``:
only a process the kernel lets read QEMU's memory (its owner or root, as
ptrace allows) can open that file, so no other user can take the lock and
block every dump, as any user could with a name in a shared namespace. The
kernel releases it however livedump ends, even by SIGKILL, and a reused PID
is another file. The holder is found in ``/proc/locks`` by the file's device
and inode, and named as what it is.
"""

import fcntl
import itertools
import os

from livedump import proc
from livedump.errors import AlreadyDumping
from livedump.vm.process import qemu_executable


class VMLock:
    """Held while this process dumps the VM of QEMU process ``pid``."""

    def __init__(self, pid: int) -> None:
        qemu_executable(pid)  # Who may not look at it, or what is not QEMU, is told so.
        self._fd = proc.open_fd(pid, "mem", "read the memory of")
        try:
            # Twice: a holder gone between the refusal and the look in /proc/locks
            # has let it go.
            for _ in range(2):
                if _try_lock(self._fd):
                    return
                holder = _holder(self._fd)
                if holder is not None:
                    break
        except BaseException:
            os.close(self._fd)
            raise
        os.close(self._fd)
        raise AlreadyDumping(_who(holder, pid))

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "VMLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> int | None:
    """The PID that took the flock on ``fd``'s file, as ``/proc/locks`` says, if it says."""
    st = os.fstat(fd)
    file = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    with open("/proc/locks") as f:
        for line in f:
            # "1: FLOCK  ADVISORY  WRITE 1234 00:15:36229 0 EOF"; a waiter's has "->".
            fields = line.split()
            if len(fields) < 6 or fields[1] != "FLOCK":
                continue
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == file:
                pid = int(fields[4])
                return pid if pid > 0 else None  # 0: in a PID namespace not seen here
    return None


def _who(holder: int | None, pid: int) -> str:
    """The refusal, naming the holder as what it is."""
    lock = f"an flock on /proc/{pid}/mem"
    if holder is None:
        return f"another process holds the dump lock of QEMU PID {pid} ({lock})"
    argv = proc.cmdline_or_none(holder)
    if argv is None:
        return f"another process (PID {holder}) holds the dump lock of QEMU PID {pid} ({lock})"
    if is_livedump(argv):
        return f"another livedump (PID {holder}) is dumping QEMU PID {pid}"
    name = os.path.basename(argv[0]) if argv else "?"
    return (f"PID {holder} ({name}), which is not livedump, holds the dump lock of "
            f"QEMU PID {pid} ({lock})")


def is_livedump(argv: list[str]) -> bool:
    """Whether a command line runs livedump: the installed script (through its
    interpreter, or itself) or ``python -m livedump``."""
    if any(os.path.basename(a) == "livedump" for a in argv[:2]):
        return True
    return any(a == "-m" and b == "livedump" for a, b in itertools.pairwise(argv))
