"""The vCPUs' state in a background snapshot's stream, read by QEMU's description
of it, and the CPU notes built from it: recorded streams of QEMU 7.2 and 10.0,
and QEMU 10.0's own notes for the same guest (integration/capture_cpu_stream.py)."""

import json
import os
import struct
from pathlib import Path

import pytest

from livedump.errors import SnapshotError
from livedump.live import devices
from livedump.live.stream import MigrationStream, RamBlock
from livedump.qmp.monitor import parse_ram_blocks
from livedump.vmcore import notes
from livedump.vmcore.arch import lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout
from livedump.vmcore.x86_notes import EFER_LMA, qemu_notes

DATA = Path(__file__).parent / "data" / "live"
# Halted at the reset vector (7.2, 10.0), and in long mode with two vCPUs (10.0).
STREAMS = {"7.2": DATA, "10.0": DATA / "qemu-10.0", "10.0-long": DATA / "qemu-10.0-long-mode"}
BLOCKS = [Block(0, 32 << 20, 0)]


def read_stream(directory: Path) -> MigrationStream:
    """The recorded stream in ``directory``, read to its end as livedump reads it."""
    known = [RamBlock(b.name, b.used)
             for b in parse_ram_blocks((directory / "ramblock.txt").read_text())]
    fd = os.open(directory / "stream.qevm", os.O_RDONLY)
    try:
        stream = MigrationStream(fd, "x86_64", known)
        stream.read_setup()
        stream.wait_snapshot()
        for _ in stream.pages():
            pass
    finally:
        os.close(fd)
    return stream


def device_state(directory: Path) -> bytes:
    """What the stream holds after RAM, as livedump keeps it."""
    stream = read_stream(directory)
    assert stream.device_state is not None
    return stream.device_state


STATE = {series: device_state(directory) for series, directory in STREAMS.items()}


@pytest.mark.parametrize("series", ["7.2", "10.0"])
def test_every_section_read_by_the_description(series):
    found = devices.sections(STATE[series])
    assert found is not None
    names = [s.name for s in found]
    assert {"cpu", "cpu_common", "apic", "globalstate", "0000:00:02.0/vga"} <= set(names)
    (cpu,) = devices.x86_cpus(found)
    # At the reset vector: real mode, CS based just below 4 GiB, halted at IP 0xfff2
    # (after cli; hlt), no long mode.
    assert cpu.index == 0 and cpu.rip == 0xFFF2 and cpu.segment("cs").base == 0xFFFF0000
    assert len(cpu.regs) == 16 and not cpu.long_mode
    assert cpu.cr[0] & 1 == 0  # CR0.PE clear


def test_notes_from_the_stream_are_qemus_own():
    """The guest of QEMU 10.0's one-page dump, halted: its notes, byte for byte,
    and the identity (ELF64 x86_64, as the first vCPU is in long mode)."""
    found = devices.sections(STATE["10.0-long"])
    assert found is not None
    cpus = devices.x86_cpus(found)
    assert [c.index for c in cpus] == [0, 1]
    assert cpus[0].long_mode and cpus[0].efer & EFER_LMA
    theirs = notes.parse((STREAMS["10.0-long"] / "one-page.vmcore").read_bytes())
    ours = qemu_notes(cpus, BLOCKS, "stream")
    assert ours.names == ("CORE", "CORE", "QEMU", "QEMU") == theirs.names
    assert ours.arch == theirs.arch
    assert ours.data == theirs.data


def test_without_a_description_there_is_no_state():
    state = STATE["10.0"]
    end, _ = devices.description(state)
    assert devices.sections(state[:end + 1]) is None  # Up to the end of file only.


def described_as(state: bytes, change) -> bytes:
    """``state`` with its description changed by ``change`` (a dict -> None)."""
    end, desc = devices.description(state)
    change(desc)
    text = json.dumps(desc).encode()
    return state[:end + 1] + bytes([devices.VMDESCRIPTION]) + struct.pack(">I", len(text)) + text


def test_a_section_the_description_lacks_is_refused():
    def rename(desc):
        next(d for d in desc["devices"] if d["name"] == "cpu")["name"] = "cpX"
    with pytest.raises(SnapshotError, match="lacks section 'cpu'"):
        devices.sections(described_as(STATE["10.0"], rename))


def test_a_description_of_other_sizes_is_refused():
    """Fields the description says are longer than QEMU wrote: the bytes run out
    or the next section's header is not one."""
    def widen(desc):
        for device in desc["devices"]:
            for field in device["fields"]:
                if field.get("type") == "uint32":
                    field["size"] = 8
    with pytest.raises(SnapshotError):
        devices.sections(described_as(STATE["7.2"], widen))


def test_a_truncated_section_is_refused():
    state = STATE["7.2"]
    end, _ = devices.description(state)
    cut = state[:200] + state[end:]  # The first sections' bytes end early.
    with pytest.raises(SnapshotError):
        devices.sections(cut)


def test_memory_after_the_largest_notes():
    layout = CoreLayout(lookup("x86_64"), BLOCKS, [], data_offset=3 * 4096)
    assert layout.data_offset == 3 * 4096 and layout.offsets == [3 * 4096]
    assert len(layout.header) == 3 * 4096
    assert CoreLayout(lookup("x86_64"), BLOCKS, [], data_offset=0).data_offset == 4096


def test_device_state_beyond_the_bound_is_dropped(monkeypatch):
    monkeypatch.setattr("livedump.live.stream.DEVICE_STATE_LIMIT", 1000)
    stream = read_stream(DATA)
    assert stream.device_state is None
    # Read to its end all the same.
    assert stream.reader.consumed == (DATA / "stream.qevm").stat().st_size
