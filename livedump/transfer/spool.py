"""A vmcore written where nobody can see it, then read back: ``--live --format kdump``.

A background snapshot sends pages in its own order, while a dump level's
choice of pages needs the guest's ``struct page`` array as of the snapshot,
which comes in that same stream. So the live ELF vmcore is written first,
out of order as always, into an unlinked file (``O_TMPFILE``) in the
output's directory: it has no name, so nothing is left behind whatever
happens to livedump, and it fills the filesystem the vmcore goes to, not
another. The kdump writer then reads it as its memory source: the pages the
stream said are zero were never written, so they are holes, found with
``SEEK_DATA``/``SEEK_HOLE`` and never read.
"""

import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator

from livedump.errors import DumpIOError, PermissionDenied, UsageError
from livedump.transfer.memory import ABSENT, DATA, Buffer, file_extents
from livedump.transfer.output import Output
from livedump.vmcore.blocks import Block

# What a filesystem (or an older kernel) says when it has no O_TMPFILE.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


class Spool(Output):
    """An :class:`Output` with no name: written like a vmcore file, then read
    as guest memory (:class:`~livedump.transfer.memory.MemorySource` and
    :class:`~livedump.transfer.memory.Populated`, addresses being file offsets).
    Closing it frees its space."""

    def __init__(self, directory: str) -> None:
        # Not Output's constructor: there is no path to create, check or commit.
        self.path = f"the spool in {directory}"
        self.force = False
        self.placement = None
        self._temp = None
        self._end = 0
        self._end_lock = threading.Lock()
        self._fd = _open_unnamed(directory)
        self.mode = stat.S_IMODE(os.fstat(self._fd).st_mode)

    def seal(self) -> None:
        """Make the file as long as what was asked for: a hole at its end reads as zeros."""
        try:
            os.ftruncate(self._fd, max(self._end, os.fstat(self._fd).st_size))
        except OSError as e:
            raise DumpIOError(f"writing {self.path}: {e.strerror}") from None

    @property
    def allocated(self) -> int:
        """Bytes of the filesystem the spool takes (its holes take none)."""
        return os.fstat(self._fd).st_blocks * 512

    def read(self, buf: Buffer, length: int, address: int,
             guest: Block | None = None) -> memoryview:
        """``length`` bytes at offset ``address`` into ``buf``."""
        done = 0
        while done < length:
            try:
                n = os.preadv(self._fd, [buf.view[done:length]], address + done)
            except OSError as e:
                raise DumpIOError(f"reading back {self.path}: {e.strerror}") from None
            if n == 0:
                raise DumpIOError(f"reading back {self.path}: it ends at {address + done:#x}")
            done += n
        return buf.view[:length]

    def extents(self, address: int, size: int) -> Iterator[tuple[int, int, int]]:
        """Data and holes (never written: zeros) of ``[address, address + size)``."""
        for start, end, data in file_extents(self._fd, address, address + size):
            yield start - address, end - start, DATA if data else ABSENT

    def commit(self) -> None:
        raise AssertionError("a spool is never put in place")

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()


def _open_unnamed(directory: str) -> int:
    """A new file in ``directory``, 0600, that no name leads to."""
    if not os.path.isdir(directory):
        raise UsageError(f"output directory {directory} does not exist")
    try:
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
        # No O_TMPFILE here: a name, removed at once.
        name = os.path.join(directory, f".livedump-spool.{secrets.token_hex(4)}")
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        os.unlink(name)
        return fd
    except PermissionError:
        raise PermissionDenied(f"may not create files in {directory}") from None
    except OSError as e:
        raise DumpIOError(f"creating a spool in {directory}: {e.strerror}") from None
