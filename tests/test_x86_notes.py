"""QEMU's x86 CPU notes, rebuilt from register values.

tests/data/*-one-page.vmcore are QEMU 7.2's own notes for firmware guests
(SeaBIOS, found nothing to boot: real mode; one and two vCPUs); the registers read back from
their ``QEMU`` notes must give the very same bytes, ``CORE`` notes
included.
"""

import io
from dataclasses import replace

import pytest
from elftools.elf.elffile import ELFFile

from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout
from livedump.vmcore.notes import QemuNotes, parse
from livedump.vmcore.x86_notes import (
    EFER_LMA,
    GPRS,
    QEMU_CPU_STATE,
    SEGMENTS,
    Segment,
    X86State,
    qemu_notes,
)

from .conftest import DATA

GiB = 1 << 30


def qemu_states(core: bytes) -> list[X86State]:
    """The registers in QEMU's QEMUCPUState notes, in CPU order."""
    elf = ELFFile(io.BytesIO(core))
    notes = next(s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE").iter_notes()
    states = []
    for index, note in enumerate(n for n in notes if n["n_name"] == "QEMU"):
        v = QEMU_CPU_STATE.unpack(note["n_descdata"])
        assert (v["version"], v["size"]) == (1, len(note["n_descdata"]))

        def seg(name: str, v: dict[str, int] = v) -> Segment:
            return Segment(*(v[f"{name}.{part}"] for part in ("selector", "base", "limit",
                                                               "flags")))
        states.append(X86State(
            index=index, regs=tuple(v[r] for r in GPRS), rip=v["rip"], rflags=v["rflags"],
            segs=tuple(seg(s) for s in SEGMENTS), ldt=seg("ldt"), tr=seg("tr"),
            gdt=seg("gdt"), idt=seg("idt"), cr=tuple(v[f"cr{i}"] for i in range(5)), efer=0,
            kernel_gs_base=v["kernel_gs_base"]))
    return states


@pytest.mark.parametrize("name, cpus", [("pc-1G", 1), ("q35-5G-smp2", 2)])
def test_rebuilt_notes_equal_qemus(name, cpus):
    core = (DATA / f"qemu-7.2-{name}-one-page.vmcore").read_bytes()
    theirs = parse(core)
    states = qemu_states(core)
    assert len(states) == cpus and not states[0].cr[0] & 1  # real mode
    # The BIOS ROM ends at 4 GiB: QEMU's ELF64 with EM_386.
    ours = qemu_notes(states, [Block(0, GiB, 0), Block(4 * GiB - 0x40000, 0x40000, 0)], "test")
    assert ours.arch == theirs.arch
    assert ours.names == theirs.names
    assert ours.data == theirs.data


def test_below_4_gib_the_same_notes_go_in_an_elf32():
    core = (DATA / "qemu-7.2-q35-5G-smp2-one-page.vmcore").read_bytes()
    ours = qemu_notes(qemu_states(core), [Block(0, 4 * GiB - 1, 0)], "test")
    assert (ours.arch.name, ours.arch.bits) == ("386", 32)
    assert ours.data == parse(core).data  # Elf32_Nhdr and Elf64_Nhdr are alike


def test_long_mode_gives_x86_64_prstatus():
    core = (DATA / "qemu-7.2-q35-5G-smp2-one-page.vmcore").read_bytes()
    first, second = qemu_states(core)
    ours = qemu_notes([replace(first, efer=EFER_LMA), second], [Block(0, GiB, 0)], "test")
    assert (ours.arch.name, ours.arch.bits) == ("x86_64", 64)
    elf_notes = list(ELFFile(io.BytesIO(_core_with(ours))).iter_segments())[0].iter_notes()
    prstatus = [n for n in elf_notes if n["n_name"] == "CORE"]
    assert [len(n["n_descdata"]) for n in prstatus] == [336, 336]  # the kernel's x86_64 size
    # pr_pid is the CPU index + 1; pr_reg starts at 112: r15 first, rip at 16 longs in.
    for i, note in enumerate(prstatus):
        desc = note["n_descdata"]
        assert int.from_bytes(desc[32:36], "little") == i + 1
        state = (first, second)[i]
        assert int.from_bytes(desc[112:120], "little") == state.regs[15]
        assert int.from_bytes(desc[112 + 16 * 8:112 + 17 * 8], "little") == state.rip


def _core_with(notes: QemuNotes) -> bytes:
    return CoreLayout(notes.arch, [Block(0, 0x1000, 0)], [notes]).header
