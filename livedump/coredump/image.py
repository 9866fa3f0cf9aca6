"""A core file's bytes: read where they are, or decompressed as they stream by.

A plain core is read with ``pread`` at the speed of the file, and its holes
(the kernel leaves pages it never populated as holes) are found with
``SEEK_DATA``/``SEEK_HOLE`` and never read. A zstd-compressed core, as
systemd-coredump stores it, is one zstd frame with no seek table: it is
decompressed in order by the zstandard library (which lets go of the GIL
while it works, so decompression runs beside livedump's copy), with nothing
written to disk. Random access is served three ways: the small segments
(QEMU's heap, stacks, ROMs: everything the RAM-map walk reads) are kept in
memory from a first pass, their zeros (most of TCG's code buffer) as
references to one zero piece; the last few MiB read are kept, for the
copy's readers that ask slightly out of order; a read before those starts
the decompression again (once per dump, typically: the guest's RAM lies
before QEMU's stacks). A compressed core is therefore decompressed about
twice: slower than a plain one, but with no temporary copy on disk.
"""

import bisect
import os
import threading
from collections import deque
from typing import IO, Protocol

import zstandard

from livedump.errors import CoreFileError, DumpIOError, UsageError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE_MAGIC = 0x184D2A50  # ...to 0x184D2A5F: a frame of metadata, no data
_FRAME_HEADER_MAX = 18
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
        return ZstdCore(path, f)
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
    """A zstd-compressed core, decompressed in order by the zstandard library."""

    compressed = True

    def __init__(self, path: str, f: IO[bytes]) -> None:
        self.path = path
        self._f = f
        self._lock = threading.Lock()
        self._reader: zstandard.ZstdDecompressionReader | None = None
        self._whole: bool | None = None  # the file's frames all end in it (found at the end)
        self._pos = 0  # the offset of the next byte the stream gives
        self._ended = False  # the stream gave its last byte
        self._recent: deque[tuple[int, bytes]] = deque()  # (offset, bytes), in order
        self._recent_bytes = 0
        self._kept_starts: list[int] = []
        self._kept: list[bytes | memoryview] = []
        self.restarts = 0

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
            data = self._decompress(_PIECE)
            if not data:
                return False
            self._remember(self._pos, data)
            self._pos += len(data)
        return True

    def _skip(self, length: int) -> None:
        """Decompress ``length`` bytes and drop them."""
        self._recent.clear()
        self._recent_bytes = 0
        while length > 0 and not self._ended:
            n = len(self._decompress(min(length, _PIECE)))
            self._pos += n
            length -= n

    def _decompress(self, size: int) -> bytes:
        """The next ``size`` bytes of the stream; fewer only at its end, which
        must be the end of a whole frame (the library's reader just stops where
        the file does)."""
        if self._ended:
            return b""
        if self._reader is None:
            self._f.seek(0)
            self._reader = zstandard.ZstdDecompressor().stream_reader(
                self._f, read_across_frames=True, closefd=False)
        data = b""
        try:
            while len(data) < size:
                more = self._reader.read(size - len(data))
                if not more:
                    break
                data = more if not data else data + more
        except zstandard.ZstdError as e:
            raise CoreFileError(f"{self.path} cannot be decompressed after "
                                f"{self._pos + len(data):#x} bytes: {e} (corrupt?)") from None
        except OSError as e:
            raise DumpIOError(f"reading {self.path}: {e.strerror}") from None
        if len(data) < size:
            self._stop()
            self._ended = True
            if self._whole is None:
                self._whole = self._frames_whole()
            if not self._whole:
                raise CoreFileError(f"{self.path} cannot be decompressed after "
                                    f"{self._pos + len(data):#x} bytes: its last zstd "
                                    "frame is cut short (truncated)")
        return data

    def _frames_whole(self) -> bool:
        """Whether the file ends where its last frame does, by the frames'
        headers and blocks' headers (the data in between is not read)."""
        fd, at = self._f.fileno(), 0
        size = os.fstat(fd).st_size
        while at < size:
            head = os.pread(fd, _FRAME_HEADER_MAX, at)
            if int.from_bytes(head[:4], "little") & ~0xF == _SKIPPABLE_MAGIC:
                at += 8 + int.from_bytes(head[4:8], "little")
                continue
            try:
                at += zstandard.frame_header_size(head)
                checksum = zstandard.get_frame_parameters(head).has_checksum
            except zstandard.ZstdError:
                return False
            last = False
            while not last:
                block = os.pread(fd, 3, at)
                if len(block) < 3:
                    return False
                header = int.from_bytes(block, "little")
                last, kind, length = bool(header & 1), (header >> 1) & 3, header >> 3
                at += 3 + (1 if kind == 1 else length)  # an RLE block holds one byte
            at += 4 if checksum else 0
        return at == size

    def _remember(self, start: int, data: bytes) -> None:
        self._recent.append((start, data))
        self._recent_bytes += len(data)
        while self._recent_bytes > _WINDOW and len(self._recent) > 1:
            self._recent_bytes -= len(self._recent.popleft()[1])

    def _restart(self) -> None:
        self._stop()
        self._recent.clear()
        self._recent_bytes = 0
        self._pos = 0
        self._ended = False
        self.restarts += 1

    def _stop(self) -> None:
        self._reader = None  # which leaves the file open (closefd=False)

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
            self._f.close()
