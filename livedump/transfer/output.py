"""Where the vmcore goes, written so that no partial file ever poses as a dump.

A file is created beside its final name, mode 0600 from the first byte
(guest memory holds secrets), and put in place only once complete, in a
way that never replaces a file that appeared meanwhile. An existing regular
file or symlink is replaced only with ``force``, never another kind of
file; a symlink at the path is never followed. Where the filesystem decides
the mode (vfat, exfat: their mount options) and gives others access, the
file is refused unless that was asked for.
"""

import ctypes
import enum
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

from livedump.errors import DumpIOError, OutputExists, PermissionDenied, UsageError

STDOUT = "-"
_ZEROS = bytes(1 << 20)
_STREAMS = ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w"))
_closed_at_start: frozenset[int] | None = None  # which of fds 0-2, once guarded
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28 and later


class Placement(enum.Enum):
    """How the finished file is put at its path, chosen for its filesystem when it is
    opened: each but REPLACE fails rather than replace a file that appeared meanwhile."""

    RENAME = "renameat2 with RENAME_NOREPLACE"  # most local filesystems, vfat and exfat too
    LINK = "a hard link"  # where the kernel or filesystem lacks that flag (NFS, 9p, ...)
    # Neither (FUSE exFAT and FAT): the name is taken with an exclusive create and the
    # file renamed over that empty claim at once, after checking it is still ours.
    CLAIM = "an exclusive create, then a rename over it"
    REPLACE = "a rename that replaces"  # --force


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

    def __init__(self, path: str, force: bool = False,
                 allow_readable_by_others: bool = False) -> None:
        self.path = path
        self.force = force
        self.mode: int | None = None  # the file's permission bits, as the filesystem has them
        self.placement: Placement | None = None
        self._temp: str | None = None
        self._fd = -1
        self._end = 0  # the furthest byte written by write_at, or asked for by extend
        self._end_lock = threading.Lock()  # write_at is called from several threads
        if path == STDOUT:
            check_stdout()
            self._fd = 1
            return
        _check_replaceable(path, force)
        directory, name = os.path.split(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"output directory {directory} does not exist")
        self._directory, self._name = directory, name
        self._temp = self._temp_name()
        # Read too: what was written is checked before it is trusted (see read_at).
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self._temp, flags, 0o600)
        except PermissionError:
            raise PermissionDenied(f"may not create files in {directory}") from None
        except OSError as e:
            raise DumpIOError(f"creating {self._temp}: {e.strerror}") from None
        try:
            self.mode = self._restrict(allow_readable_by_others)
            self.placement = Placement.REPLACE if force else self._placement()
        except BaseException:
            self._discard()
            raise

    def _temp_name(self) -> str:
        return os.path.join(self._directory, f".{self._name}.{secrets.token_hex(4)}.partial")

    def _restrict(self, allow_others: bool) -> int:
        """Make the file 0600 where the filesystem lets us; its mode, checked.

        vfat and exfat take the mode from their mount options and refuse or
        ignore a change; a file others could read guest memory from is refused,
        here, before the guest is held, unless ``allow_others``.
        """
        assert self._temp is not None
        try:
            os.fchmod(self._fd, stat.S_IRUSR | stat.S_IWUSR)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                raise DumpIOError(f"creating {self._temp}: {e.strerror}") from None
        mode = stat.S_IMODE(os.fstat(self._fd).st_mode)
        if open_to_others(mode) and not allow_others:
            raise UsageError(
                f"{self.path} would have mode {mode:04o} on the filesystem of "
                f"{self._directory}, which sets it (vfat, exfat: mount with umask=077): "
                "others could read guest memory; write it elsewhere, or give "
                "--allow-readable-by-others")
        return mode

    def _placement(self) -> Placement:
        """How this filesystem lets the file be put in place without replacing another,
        tried on the temporary file itself: renamed to a new temporary name with
        RENAME_NOREPLACE, else linked to one."""
        assert self._temp is not None
        moved = self._temp_name()
        try:
            try:
                _rename_noreplace(self._temp, moved)
                self._temp = moved
                return Placement.RENAME
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            try:
                os.link(self._temp, moved)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                return Placement.CLAIM
            os.unlink(self._temp)
            self._temp = moved
            return Placement.LINK
        except OSError as e:
            raise DumpIOError(f"creating {self._temp}: {e.strerror}") from None

    @property
    def partial_path(self) -> str | None:
        """The file's name while it is written (None once it is in place, or for
        standard output): what to remove should this process die."""
        return self._temp

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
        appeared = OutputExists(f"{self.path} appeared during the dump; the dump was not written")
        try:
            # A trailing hole, wherever the file was written up to.
            os.ftruncate(self._fd, max(self._end, os.lseek(self._fd, 0, os.SEEK_CUR)))
            self._close()
            if self.placement is Placement.REPLACE:
                _check_replaceable(self.path, True, finishing=True)
                os.replace(self._temp, self.path)
            elif self.placement is Placement.RENAME:
                try:
                    _rename_noreplace(self._temp, self.path)
                except FileExistsError:
                    raise appeared from None
            elif self.placement is Placement.LINK:
                try:
                    os.link(self._temp, self.path)  # Fails, atomically, if the path appeared.
                except FileExistsError:
                    raise appeared from None
                return  # The temporary name goes below.
            elif not _claim_and_rename(self._temp, self.path):
                raise appeared
            self._temp = None  # It is the file at the path now.
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


def open_to_others(mode: int) -> bool:
    """Whether permission bits ``mode`` let anyone but the owner at the file."""
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def _check_replaceable(path: str, force: bool, finishing: bool = False) -> None:
    """Refuse a path that exists, unless ``force`` and it is a regular file or a symlink:
    --force must never turn a device node, FIFO or directory into a vmcore."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError:
        return  # Whatever is wrong with the path, creating the file beside it says.
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        if finishing:
            raise OutputExists(f"{path} became {kind} during the dump; the dump was not "
                               "written (livedump replaces only regular files and symlinks)")
        raise OutputExists(f"{path} is {kind}: livedump replaces only regular files "
                           "and symlinks, even with --force")
    if not force:
        raise OutputExists(f"{path} exists (use --force to replace it)")


def _rename_noreplace(source: str, target: str) -> None:
    """rename(2) that fails with EEXIST rather than replace ``target``."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                  _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _claim_and_rename(source: str, target: str) -> bool:
    """Put ``source`` at ``target`` where neither RENAME_NOREPLACE nor links exist: take
    the name with an exclusive create (which fails if anything is there), and rename over
    that empty claim while it is still ours. False, with nothing changed, if the name was
    taken or the claim was touched."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        return False
    try:
        ours = os.fstat(fd)
        # With the claim still open, so that its inode number stays the same.
        now = os.lstat(target)
        if (now.st_dev, now.st_ino, now.st_size) != (ours.st_dev, ours.st_ino, 0):
            return False
        try:
            os.rename(source, target)
        except BaseException:
            os.unlink(target)
            raise
        return True
    finally:
        os.close(fd)


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
