"""Where the vmcore goes, written so that no partial file ever poses as a dump.

A file is created beside its final name, mode 0600 from the first byte
(guest memory holds secrets), and linked into place only once complete.
An existing file is replaced only with ``force``; a symlink at the path
is never followed.
"""

import errno
import fcntl
import os
import secrets
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import DumpIOError, OutputExists, PermissionDenied, UsageError

STDOUT = "-"
_ZEROS = bytes(1 << 20)
_STREAMS = ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w"))
_closed_at_start: frozenset[int] | None = None  # which of fds 0-2, once guarded


def guard_standard_fds() -> None:
    """Open /dev/null on each of fds 0-2 that is closed; call before anything opens a file.

    A closed one would be the number the next open file or socket takes
    (the monitor's, the lock's), and what is meant for standard output or
    error (the vmcore, with ``-``; the report) would go into it. Python has
    left ``sys.stdout`` (say) None for a closed fd, and a ``print`` to a None
    ``sys.stderr`` writes to standard output: each becomes a stream on
    /dev/null. Once per process; later calls change nothing.
    """
    global _closed_at_start
    if _closed_at_start is not None:
        return
    closed = []
    for fd, name, mode in _STREAMS:
        try:
            os.fstat(fd)
            continue
        except OSError as e:
            if e.errno != errno.EBADF:
                continue
        null = os.open(os.devnull, os.O_RDWR)  # The lowest free number: ``fd`` itself.
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))
        closed.append(fd)
    _closed_at_start = frozenset(closed)


def check_stdout() -> None:
    """Refuse standard output as the vmcore's destination where nothing could read it."""
    try:
        flags = fcntl.fcntl(1, fcntl.F_GETFL)
    except OSError:
        flags = -1
    if flags == -1 or 1 in (_closed_at_start or ()):
        raise UsageError("standard output is closed: give a file for the vmcore, "
                         "or redirect standard output to where it should go")
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise UsageError("standard output is open for reading only: redirect it to where "
                         "the vmcore should go")
    if os.isatty(1):
        raise UsageError("refusing to write a vmcore to a terminal; redirect standard output")


class Output:
    """A write-once destination: a new file, or standard output for ``-``."""

    def __init__(self, path: str, force: bool = False) -> None:
        self.path = path
        self.force = force
        self._temp: str | None = None
        self._end = 0  # the furthest byte written by write_at, or asked for by extend
        self._end_lock = threading.Lock()  # write_at is called from several threads
        if path == STDOUT:
            check_stdout()
            self._fd = 1
            return
        if os.path.lexists(path) and not force:
            raise OutputExists(f"{path} exists (use --force to replace it)")
        directory, name = os.path.split(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"output directory {directory} does not exist")
        self._temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")
        # Read too: what was written is checked before it is trusted (see read_at).
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self._temp, flags, 0o600)
            os.fchmod(self._fd, stat.S_IRUSR | stat.S_IWUSR)
        except PermissionError:
            raise PermissionDenied(f"may not create files in {directory}") from None
        except OSError as e:
            raise DumpIOError(f"creating {self._temp}: {e.strerror}") from None

    @property
    def is_stdout(self) -> bool:
        return self.path == STDOUT

    def skip(self, length: int) -> None:
        """Advance over ``length`` zero bytes: a hole in a file, real zeros in a pipe."""
        if self.is_stdout:
            for done in range(0, length, len(_ZEROS)):
                self.write(_ZEROS[: min(len(_ZEROS), length - done)])
            return
        try:
            os.lseek(self._fd, length, os.SEEK_CUR)
        except OSError as e:
            raise DumpIOError(f"writing {self.path}: {e.strerror}") from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                if e.errno == errno.EPIPE:
                    raise DumpIOError("the reader of standard output went away") from None
                raise DumpIOError(f"writing {self.path}: {e.strerror}") from None
            view = view[n:]

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` of a file (a header patched once the data is known,
        or pages that arrive out of order), leaving the write position alone."""
        if self.is_stdout:
            raise DumpIOError("standard output cannot be written out of order")
        self.extend(offset + len(data))
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as e:
                raise DumpIOError(f"writing {self.path}: {e.strerror}") from None
            view, offset = view[n:], offset + n

    def extend(self, size: int) -> None:
        """Make the finished file at least ``size`` bytes long (zeros past what is written)."""
        with self._end_lock:
            self._end = max(self._end, size)

    def read_at(self, offset: int, length: int) -> bytes:
        """Read back ``length`` bytes of the file at ``offset`` (holes read as zeros):
        guest memory, once written, for checks that must not hold the guest."""
        if self.is_stdout:
            raise DumpIOError("standard output cannot be read back")
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise DumpIOError(f"reading back {self.path}: {e.strerror}") from None

    def commit(self) -> None:
        """Put the finished file at its path."""
        if self._temp is None:
            return
        try:
            # A trailing hole, wherever the file was written up to.
            os.ftruncate(self._fd, max(self._end, os.lseek(self._fd, 0, os.SEEK_CUR)))
            self._close()
            if self.force:
                os.replace(self._temp, self.path)
            else:
                try:
                    os.link(self._temp, self.path)  # Fails, atomically, if the path appeared.
                except FileExistsError:
                    raise OutputExists(
                        f"{self.path} appeared during the dump; the dump was not written"
                    ) from None
        except OSError as e:
            raise DumpIOError(f"finishing {self.path}: {e.strerror}") from None
        finally:
            self._discard()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _discard(self) -> None:
        """Remove the temporary file (after commit, only its now redundant name)."""
        if self._temp is not None:
            self._close()
            try:
                os.unlink(self._temp)
            except FileNotFoundError:
                pass
            self._temp = None

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc: object) -> None:
        self._discard()


@contextmanager
def replacing(target: Path, mode: int) -> Iterator[BinaryIO]:
    """A new file that becomes ``target`` in one step if the block succeeds,
    so no reader ever sees half of it."""
    fd, temporary = tempfile.mkstemp(prefix=f"{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        with open(temporary, "wb") as out:  # Its name is the path, for checks on it.
            yield out
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
