"""QEMU's RAM selection for memory devices, on replies and structures QEMU gives:
virtio-mem devices cut to their plugged blocks, NVDIMMs dumped."""

import pytest

from livedump.errors import MonitorError
from livedump.ptrace.ram_map import Plugged
from livedump.qmp.memory_devices import VirtioMem, clip, parse_memory_devices, pieces_of
from livedump.qmp.ram_map import FlatRange, parse_flatview, volatile_alias_targets
from livedump.vmcore.arch import lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout, Note, read_loads

MiB, GiB = 1 << 20, 1 << 30

# QEMU 10.0's reply for an NVDIMM and a virtio-mem device with 96 MiB plugged.
REPLY: list[object] = [
    {"type": "nvdimm", "data": {"memdev": "/objects/nv0", "hotplugged": False,
                                "addr": 5 * GiB, "hotpluggable": True, "size": 128 * MiB,
                                "slot": 0, "node": 0, "id": "nv0dev"}},
    {"type": "virtio-mem", "data": {"memaddr": 4 * GiB, "node": 0, "requested-size": 96 * MiB,
                                    "size": 96 * MiB, "max-size": GiB, "block-size": 2 * MiB,
                                    "memdev": "/objects/vmem0", "id": "vm0"}},
]
DEVICE = VirtioMem("vm0", 4 * GiB, GiB, 96 * MiB, 2 * MiB)


def test_virtio_mem_devices_from_the_reply():
    assert parse_memory_devices(REPLY) == [DEVICE]


def test_a_reply_no_qemu_sends_is_refused():
    data = REPLY[1]["data"]  # type: ignore[index]
    broken: list[object] = [{"type": "virtio-mem", "data": {**data, "size": 2 * GiB}}]
    with pytest.raises(MonitorError, match="query-memory-devices"):
        parse_memory_devices(broken)
    with pytest.raises(MonitorError, match="query-memory-devices"):
        parse_memory_devices([{"type": "virtio-mem", "data": {"id": "x"}}])


def test_plugged_spans_from_the_size_or_from_qemus_dump():
    assert VirtioMem("a", 4 * GiB, GiB, 0, 2 * MiB).spans(None) == []
    assert VirtioMem("a", 4 * GiB, GiB, GiB, 2 * MiB).spans(None) == [(4 * GiB, GiB)]
    with pytest.raises(ValueError):
        DEVICE.spans(None)
    loads = [(0, 512 * MiB), (4 * GiB, 64 * MiB), (4 * GiB + 128 * MiB, 32 * MiB)]
    assert DEVICE.spans(loads) == [(4 * GiB, 64 * MiB), (4 * GiB + 128 * MiB, 32 * MiB)]
    with pytest.raises(MonitorError, match="0x2000000 bytes plugged|plugged"):
        DEVICE.spans(loads[:2])  # QEMU's dump and its size disagree.


def test_the_view_cut_to_the_plugged_spans():
    view = [FlatRange(0, 512 * MiB, "ram", "pc.ram", 0),
            FlatRange(4 * GiB - 4096, 4096, "i/o", "mmio", 0),
            FlatRange(4 * GiB, GiB, "ram", "vmem0", 0)]
    plugged = {DEVICE: [(4 * GiB, 64 * MiB), (4 * GiB + 128 * MiB, 32 * MiB)]}
    kept, cut = clip(view, [DEVICE], plugged)
    assert kept == [view[0], view[1], FlatRange(4 * GiB, 64 * MiB, "ram", "vmem0", 0),
                    FlatRange(4 * GiB + 128 * MiB, 32 * MiB, "ram", "vmem0", 128 * MiB)]
    assert cut == [FlatRange(4 * GiB + 64 * MiB, 64 * MiB, "ram", "vmem0", 64 * MiB),
                   FlatRange(4 * GiB + 160 * MiB, GiB - 160 * MiB, "ram", "vmem0", 160 * MiB)]
    assert pieces_of(0, 512 * MiB, [DEVICE], plugged) is None
    # A range reaching past the window keeps what lies outside it.
    assert pieces_of(4 * GiB - MiB, 3 * MiB, [DEVICE], {DEVICE: []}) == [(4 * GiB - MiB, 4 * GiB)]


# 'info mtree' and 'info mtree -f' of QEMU 7.2 with an NVDIMM (abridged).
MTREE = ("address-space: memory\r\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\r\n"
         "    0000000100000000-000000010fffffff (prio 0, nv-ram): alias nvdimm-memory @nv0 "
         "0000000000000000-000000000fffffff\r\n\r\n"
         "memory-region: pc.ram\r\n"
         "  0000000000000000-000000003fffffff (prio 0, ram): pc.ram\r\n\r\n"
         "memory-region: nv0\r\n  0000000000000000-000000000fffffff (prio 0, ram): nv0\r\n\r\n"
         "memory-region: pmem\r\n  0000000000000000-000000000fffffff (prio 0, nv-ram): pmem\r\n")
FLAT = ('FlatView #0\r\n AS "memory", root: system\r\n Root memory region: system\r\n'
        "  0000000000000000-000000003fffffff (prio 0, ram): pc.ram\r\n"
        "  0000000100000000-000000010fffffff (prio 0, nv-ram): nv0\r\n\r\n")


def test_nvdimm_is_dumped_a_non_volatile_region_is_not():
    """Non-volatile only through its alias: dumped, as QEMU's dump checks the region."""
    assert volatile_alias_targets(MTREE) == {"pc.ram", "nv0"}
    nvdimm = parse_flatview(FLAT)[1]
    assert nvdimm.type == "nv-ram" and not nvdimm.dumped
    assert FlatRange(nvdimm.gpa, nvdimm.size, "nv-ram", "nv0", 0, volatile_region=True).dumped
    assert not FlatRange(0, 4096, "nv-i/o", "x", 0, volatile_region=True).dumped


def test_plugged_runs_of_the_bitmap():
    p = Plugged(block_size=4, bitmap=0b1101_1001, blocks=8)  # blocks 0, 3-4, 6-7
    assert p.runs(0, 32) == [(0, 4), (12, 20), (24, 32)]
    assert p.runs(2, 20) == [(2, 4), (12, 20)]
    assert p.runs(13, 100) == [(13, 20), (24, 32)]  # nothing past the last block
    assert Plugged(4, 0, 8).runs(0, 32) == []
    assert Plugged(4, 0xFF, 8).runs(0, 32) == [(0, 32)]


def test_loads_of_a_vmcore_header():
    blocks = [Block(0, 640 << 10, 0x7F0000000000), Block(4 * GiB, 64 * MiB, 0x7F1000000000)]
    header = CoreLayout(lookup("x86_64"), blocks, [Note("CORE", 1, b"x" * 8)]).header
    assert read_loads(header) == [(0, 640 << 10), (4 * GiB, 64 * MiB)]
