"""A core file's bytes: read where they are, or decompressed as they stream by.

A plain core is read with ``pread`` at the speed of the file, and its holes
(the kernel leaves pages it never populated as holes) are found with
``SEEK_DATA``/``SEEK_HOLE`` and never read. A zstd-compressed core, as
systemd-coredump stores it, is one zstd frame with no seek table: it is
decompressed by the ``zstd`` program (its own process, so decompression
runs beside livedump's copy) in order, with nothing written to disk.
Random access is served three ways: the small segments (QEMU's heap,
stacks, ROMs: everything the RAM-map walk reads) are kept in memory from a
first pass, their zeros (most of TCG's code buffer) as references to one
zero piece; the last few MiB read are kept, for the copy's readers that ask
slightly out of order; a read before those starts the decompression again
(once per dump, typically: the guest's RAM lies before QEMU's stacks). A
compressed core is therefore decompressed about twice: slower than a plain
one, but with no temporary copy on disk.
"""

import bisect
import io
import os
import shutil
import subprocess
import threading
import typing
from collections import deque
from typing import IO, Protocol

from livedump.errors import CoreFileError, DumpIOError, UsageError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PIECE = 1 << 20  # bytes decompressed per read of the stream
_WINDOW = 64 << 20  # the recent bytes kept for readers slightly out of order
_KEEP_SEGMENT = 64 << 20  # segments up to this size are kept from the first pass...
_KEEP_TOTAL = 512 << 20  # ...up to this many bytes of data (not zeros) in all
_ZEROS = bytes(_PIECE)


class CoreBytes(Protocol):
    """A core file's bytes by offset."""

    def pread(self, offset: int, size: int) -> bytes: ...
    def readinto(self, view: memoryview, offset: int) -> None: ...
    def data_runs(self, offset: int, size: int) -> list[tuple[int, int, bool]]: ...
    def close(self) -> None: ...


def open_core(path: str) -> "PlainCore | ZstdCore":
    """The core at ``path``: a plain file, or a zstd-compressed one (by its magic)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (kept open by the object returned)
    except PermissionError:
        from livedump.errors import PermissionDenied

        raise PermissionDenied(f"may not read {path}") from None
    except OSError as e:
        raise UsageError(f"cannot open the core {path}: {e.strerror}") from None
    if f.read(4) == ZSTD_MAGIC:
        f.close()
        return ZstdCore(path)
    return PlainCore(path, f)


class PlainCore:
    """An uncompressed core, read in place."""

    compressed = False

    def __init__(self, path: str, f: IO[bytes]) -> None:
        self.path = path
        self._f = f
        self.size = os.fstat(f.fileno()).st_size

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self._f.fileno(), size, offset)

    def readinto(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._f.fileno(), [view[done:]], offset + done)
            except OSError as e:
                raise DumpIOError(f"reading {self.path} at {offset + done:#x}: "
                                  f"{e.strerror}") from None
            if n == 0:
                raise CoreFileError(f"{self.path} ends at {offset + done:#x}: truncated")
            done += n

    def data_runs(self, offset: int, size: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, has data)`` runs of ``[offset, offset + size)``,
        relative to ``offset``: the file's holes are zeros nobody need read."""
        fd, end, at, runs = self._f.fileno(), offset + size, offset, []
        while at < end:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole to the end; or no SEEK_DATA here
                data = end if self._has_seek_data() else at
            data = min(data, end)
            if data > at:
                runs.append((at - offset, data - at, False))
            if data >= end:
                break
            try:
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            except OSError:
                hole = end
            runs.append((data - offset, hole - data, True))
            at = hole
        return runs

    def _has_seek_data(self) -> bool:
        try:
            os.lseek(self._f.fileno(), 0, os.SEEK_DATA)
        except OSError:
            return self.size == 0
        return True

    def close(self) -> None:
        self._f.close()


class ZstdCore:
    """A zstd-compressed core, decompressed in order by ``zstd -dc``."""

    compressed = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._zstd = shutil.which("zstd")
        if self._zstd is None:
            raise UsageError(f"{path} is compressed with zstd: install zstd (the program) "
                             "to read it")
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pos = 0  # the offset of the next byte the stream gives
        self._ended = False  # the stream gave its last byte
        self._recent: deque[tuple[int, bytes]] = deque()  # (offset, bytes), in order
        self._recent_bytes = 0
        self._kept_starts: list[int] = []
        self._kept: list[bytes | memoryview] = []
        self.restarts = 0
        self._scratch = bytearray(_PIECE)

    # -- reading --------------------------------------------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        with self._lock:
            got = self._fill(memoryview(out), offset, short_ok=True)
        return bytes(out[:got])

    def readinto(self, view: memoryview, offset: int) -> None:
        with self._lock:
            self._fill(view, offset, short_ok=False)

    def data_runs(self, offset: int, size: int) -> list[tuple[int, int, bool]]:
        return [(0, size, True)]

    def _fill(self, view: memoryview, offset: int, short_ok: bool) -> int:
        """Copy the bytes at ``offset`` into ``view``; the lock is held."""
        done = 0
        while done < len(view):
            at = offset + done
            piece = self._find(at)
            if piece is None:
                if at < self._pos:
                    self._restart()
                if not self._advance(at):
                    if short_ok:
                        return done
                    raise CoreFileError(f"{self.path} ends at {self._pos:#x} "
                                        f"(decompressed): truncated")
                continue
            start, data = piece
            n = min(len(view) - done, start + len(data) - at)
            view[done : done + n] = data[at - start : at - start + n]
            done += n
        return done

    def _find(self, at: int) -> tuple[int, bytes | memoryview] | None:
        i = bisect.bisect_right(self._kept_starts, at) - 1
        if i >= 0 and at < self._kept_starts[i] + len(self._kept[i]):
            return self._kept_starts[i], self._kept[i]
        for start, data in self._recent:
            if start <= at < start + len(data):
                return start, data
        return None

    def _advance(self, at: int) -> bool:
        """Decompress until ``at`` is among the recent bytes; False at the end."""
        while self._pos <= at:
            if self._ended:
                return False
            if at - self._pos > _WINDOW + _PIECE:  # far behind: skip, keeping nothing
                self._skip(at - _WINDOW - self._pos)
                continue
            data = self._next_piece()
            if not data:
                return False
            self._remember(self._pos, data)
            self._pos += len(data)
        return True

    def _next_piece(self) -> bytes:
        if self._ended:
            return b""
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdout is not None
        data = self._proc.stdout.read(_PIECE)
        if len(data) < _PIECE:
            self._end_of_stream(self._pos + len(data))
        return data

    def _skip(self, length: int) -> None:
        """Decompress ``length`` bytes and drop them."""
        if self._ended:
            return
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdout is not None
        self._recent.clear()
        self._recent_bytes = 0
        scratch = memoryview(self._scratch)
        while length > 0:
            stream = typing.cast(io.BufferedReader, self._proc.stdout)
            n = stream.readinto(scratch[: min(length, len(scratch))])
            if not n:
                self._end_of_stream(self._pos)
                return
            self._pos += n
            length -= n

    def _remember(self, start: int, data: bytes) -> None:
        self._recent.append((start, data))
        self._recent_bytes += len(data)
        while self._recent_bytes > _WINDOW and len(self._recent) > 1:
            self._recent_bytes -= len(self._recent.popleft()[1])

    def _start(self) -> None:
        assert self._zstd is not None
        self._proc = subprocess.Popen([self._zstd, "-dcq", "--", self.path],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, bufsize=_PIECE)

    def _end_of_stream(self, end: int) -> None:
        """The stream ended at ``end``: whole, or cut short (zstd says so)."""
        assert self._proc is not None
        self._proc.wait()
        assert self._proc.stderr is not None
        error = self._proc.stderr.read().decode(errors="replace").strip()
        code = self._proc.returncode
        self._proc = None
        self._ended = True
        if code != 0:
            reason = error.splitlines()[-1] if error else f"zstd exited with {code}"
            raise CoreFileError(f"{self.path} cannot be decompressed after {end:#x} bytes: "
                                f"{reason} (truncated?)")

    def _restart(self) -> None:
        self._stop()
        self._recent.clear()
        self._recent_bytes = 0
        self._pos = 0
        self._ended = False
        self.restarts += 1

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdout, self._proc.stderr):
                if pipe is not None:
                    pipe.close()
            self._proc = None

    # -- the first pass -------------------------------------------------------------

    def keep(self, spans: list[tuple[int, int]]) -> None:
        """Keep in memory the file ranges ``spans`` (``(offset, size)``: the
        small segments), read in one pass from the start, as far as the last.
        Their zeros (most of TCG's code buffer, say) are kept as references
        to one zero piece, and no more than :data:`_KEEP_TOTAL` bytes of data
        in all. A core cut short is found where a read needs what is missing."""
        chosen = sorted(s for s in spans if 0 < s[1] <= _KEEP_SEGMENT)
        kept = 0
        with self._lock:
            for offset, size in chosen:
                at, end = offset, offset + size
                while at < end and kept < _KEEP_TOTAL:
                    piece = self._find(at)
                    if piece is None:
                        if at < self._pos:  # behind the stream (gcore's notes are last)
                            self._restart()
                        if not self._advance(at):
                            raise CoreFileError(f"{self.path} ends at {self._pos:#x} "
                                                "(decompressed): truncated")
                        continue
                    start, data = piece
                    first, last = at - start, min(end - start, len(data))
                    part: bytes | memoryview
                    if data[first:last] == _ZEROS[: last - first]:
                        part = memoryview(_ZEROS)[: last - first]
                    else:
                        part = data if (first, last) == (0, len(data)) else data[first:last]
                        kept += len(part)
                    self._kept_starts.append(at)
                    self._kept.append(part)
                    at += last - first
            self.restarts = 0

    def close(self) -> None:
        with self._lock:
            self._stop()
