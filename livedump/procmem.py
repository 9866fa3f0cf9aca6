"""QEMU's address space seen from outside: its mappings, and reads of its memory."""

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .coalesce import Block
from .errors import DumpIOError, GuestMemoryError, PermissionDenied, ProcessNotFound


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of ``/proc/PID/maps``."""
    maps = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        start, _, end = fields[0].partition("-")
        maps.append(
            Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                    fields[5] if len(fields) > 5 else "")
        )
    return maps


def read_maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except FileNotFoundError:
        raise ProcessNotFound(f"QEMU (PID {pid}) has exited") from None
    except PermissionError:
        raise PermissionDenied(f"may not read the mappings of PID {pid}") from None


def check_blocks(blocks: Sequence[Block], maps: Sequence[Mapping]) -> None:
    """Fail unless every block lies in readable mappings of the process.

    The monitor's map and the process's must agree; if they do not, we
    would read the wrong memory, so stop before writing anything.
    """
    for b in blocks:
        addr, end = b.hva, b.hva + b.size
        for m in maps:
            if m.start <= addr < m.end:
                if "r" not in m.perms:
                    break
                addr = m.end
                if addr >= end:
                    break
        if addr < end:
            raise GuestMemoryError(
                f"guest RAM at {b.gpa:#x} (host {b.hva:#x}, {b.size:#x} bytes) "
                f"is not mapped readable in QEMU at {addr:#x}"
            )


class ProcessMemory:
    """Reads from another process's address space through ``/proc/PID/mem``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessNotFound(f"QEMU (PID {pid}) has exited") from None
        except PermissionError:
            raise PermissionDenied(
                f"may not read the memory of PID {pid} (run as its owner or root; "
                "check kernel.yama.ptrace_scope)"
            ) from None

    def read_into(self, buf: memoryview, address: int) -> None:
        """Fill ``buf`` with the bytes at ``address``."""
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self._fd, [buf[done:]], address + done)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessNotFound(f"QEMU (PID {self.pid}) exited during the dump") from None
                raise DumpIOError(
                    f"reading QEMU memory at {address + done:#x}: {e.strerror}"
                ) from None
            if n == 0:
                raise DumpIOError(f"reading QEMU memory at {address + done:#x}: unexpected end")
            done += n

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
