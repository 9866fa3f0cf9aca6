"""QEMU's notes, from one-page dumps QEMU 7.2 wrote (tests/data/*-one-page.vmcore:
dump-guest-memory of 4 KiB at 1 MiB of a paused firmware-only guest)."""

import pytest

from livedump.arch import from_elf
from livedump.coalesce import Block
from livedump.dump import provenance_note
from livedump.elfcore import CoreLayout
from livedump.errors import MonitorError, UsageError
from livedump.notes import parse

from .conftest import DATA
from .test_elfcore import parse as parse_layout


@pytest.mark.parametrize("name, cpus", [("pc-1G", 1), ("q35-5G-smp2", 2)])
def test_notes_and_arch_of_qemus_dump(name, cpus):
    notes = parse((DATA / f"qemu-7.2-{name}-one-page.vmcore").read_bytes())
    # A guest out of long mode whose memory reaches 4 GiB: QEMU says ELF64 EM_386.
    assert (notes.arch.name, notes.arch.bits, notes.arch.byteorder) == ("386", 64, "little")
    assert notes.names == ("CORE",) * cpus + ("QEMU",) * cpus  # QEMU's order


def test_notes_are_carried_verbatim_into_the_vmcore():
    notes = parse((DATA / "qemu-7.2-q35-5G-smp2-one-page.vmcore").read_bytes())
    layout = CoreLayout(notes.arch, [Block(0, 0x1000, 0)], [notes, provenance_note(1)])
    elf = parse_layout(layout)
    got = [(n["n_name"], n["n_type"]) for n in next(elf.iter_segments()).iter_notes()]
    assert got == [("CORE", "NT_PRSTATUS")] * 2 + [("QEMU", 0)] * 2 + [("LIVEDUMP", 0x4C564450)]
    assert elf.elfclass == 64 and elf["e_machine"] == "EM_386"


def test_garbage_is_a_monitor_error():
    with pytest.raises(MonitorError, match="not a vmcore livedump can read"):
        parse(b"\\x7fELF" + bytes(60))


def test_unknown_machine():
    with pytest.raises(UsageError, match="EM_MIPS"):
        from_elf("EM_MIPS", 64, False)
