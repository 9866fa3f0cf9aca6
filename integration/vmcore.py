"""Read vmcores with pyelftools, independently of livedump's own code."""

from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

CHUNK = 16 << 20


@dataclass(frozen=True)
class Load:
    paddr: int
    vaddr: int
    memsz: int
    filesz: int
    offset: int


def loads(path: Path) -> list[Load]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [
            Load(s["p_paddr"], s["p_vaddr"], s["p_memsz"], s["p_filesz"], s["p_offset"])
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]


def read_phys(path: Path, gpa: int, size: int) -> bytes:
    """The ``size`` bytes at guest-physical ``gpa``, which must lie in one PT_LOAD."""
    for load in loads(path):
        if load.paddr <= gpa and gpa + size <= load.paddr + load.filesz:
            with open(path, "rb") as f:
                f.seek(load.offset + gpa - load.paddr)
                return f.read(size)
    raise AssertionError(f"no PT_LOAD holds {size} bytes at {gpa:#x}")


def first_difference(a: Path, b: Path) -> str | None:
    """Compare the PT_LOAD lists and every byte of memory; describe the first difference."""
    la, lb = loads(a), loads(b)
    key = [(x.paddr, x.vaddr, x.memsz, x.filesz) for x in la]
    if key != [(x.paddr, x.vaddr, x.memsz, x.filesz) for x in lb]:
        return f"PT_LOAD lists differ:\n{la}\n{lb}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for x, y in zip(la, lb, strict=True):
            fa.seek(x.offset)
            fb.seek(y.offset)
            for done in range(0, x.filesz, CHUNK):
                n = min(CHUNK, x.filesz - done)
                ca, cb = fa.read(n), fb.read(n)
                if ca != cb:
                    i = next(i for i in range(n) if ca[i : i + 1] != cb[i : i + 1])
                    return f"memory differs at guest-physical {x.paddr + done + i:#x}"
    return None


def notes(path: Path) -> list[tuple[str, int, bytes]]:
    """Owner, type and descriptor of every note, in file order."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [(n["n_name"], n["n_type"], n["n_descdata"])
                for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"
                for n in s.iter_notes()]


def identity(path: Path) -> tuple:
    """ELF class, byte order, machine and the (owner, type) of each note but livedump's own."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        header = elf.elfclass, elf.little_endian, elf["e_machine"]
    return (*header, [(name, type_) for name, type_, _ in notes(path) if name != "LIVEDUMP"])


def note_segments(path: Path) -> list[tuple[int, int]]:
    """File offset and size of each PT_NOTE."""
    with open(path, "rb") as f:
        return [(s["p_offset"], s["p_filesz"]) for s in ELFFile(f).iter_segments()
                if s["p_type"] == "PT_NOTE"]
