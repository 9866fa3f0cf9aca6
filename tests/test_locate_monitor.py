"""The monitor-based RAM map, on monitor sessions recorded from QEMU 7.2."""

import dataclasses
import itertools

import pytest

from livedump.errors import GuestMemoryError, MonitorError
from livedump.qmp import ram_map as locate
from livedump.qmp.monitor import Monitor, RamBlock, parse_ram_blocks
from livedump.transfer.memory import Mapping
from livedump.vmcore.blocks import GuestRange, coalesce

from .conftest import DATA, ReplayTransport


def mtree_text(session: dict) -> str:
    return next(x["return"] for x in session["exchanges"]
                if x["arguments"] == {"command-line": "info mtree -f"})


def test_blocks_equal_qemu_dump(session):
    """Parsing, selection and coalescing together give QEMU's own PT_LOAD list."""
    monitor = Monitor(ReplayTransport(session))
    ranges = locate.guest_ranges(monitor, locate.flat_view(monitor))
    assert [[b.gpa, b.size] for b in coalesce(ranges)] == session["qemu_dump_loads"]


def test_flatview_of_memory_address_space(session):
    ranges = locate.parse_flatview(mtree_text(session))
    assert ranges
    # Ranges are sorted and do not overlap.
    assert all(a.gpa + a.size <= b.gpa for a, b in itertools.pairwise(ranges))


@pytest.mark.parametrize("name", ["pc-1G-seabios", "q35-5G-seabios"])
def test_pc_ram_vga_hole_and_bios_rom(name):
    ranges = locate.parse_flatview(mtree_text(_load(name)))
    assert ranges[0].gpa == 0 and ranges[0].name == "pc.ram" and ranges[0].type == "ram"
    by_name = {r.name: r for r in ranges}
    assert by_name["vga-lowmem"].type == "i/o" and not by_name["vga-lowmem"].dumped
    assert by_name["pc.bios"].type == "rom" and by_name["pc.bios"].dumped


# The RAM each machine's dump holds: flash (a ROM device, "romd") and the
# MMIO of interrupt controllers are left out, as QEMU's dump leaves them.
@pytest.mark.parametrize("name, dumped, not_dumped", [
    ("pc-i386-512M-pflash", {"pc.ram"}, {"system.flash0"}),
    ("virt-aarch64-512M", {"mach-virt.ram"}, {"virt.flash0", "virt.flash1"}),
    ("pseries-512M", {"ppc_spapr.ram"}, {"xive.esb-emulated", "xive.tima"}),
    ("powernv9-1G", {"pnv.ram"}, {"homer-main-memory", "occ-common-area", "xscom-0"}),
    ("s390-ccw-virtio-512M", {"s390.ram"}, set()),
])
def test_what_each_machine_dumps(name, dumped, not_dumped):
    ranges = locate.parse_flatview(mtree_text(_load(name)))
    assert {r.name for r in ranges if r.dumped} == dumped
    assert not_dumped <= {r.name for r in ranges if not r.dumped}


def test_flash_is_a_rom_device():
    ranges = locate.parse_flatview(mtree_text(_load("virt-aarch64-512M")))
    assert (ranges[0].gpa, ranges[0].size, ranges[0].type) == (0, 64 << 20, "romd")


def test_root_region_that_is_ram_itself():
    """s390's flat view has no container: its root is the RAM region."""
    ranges = locate.parse_flatview(mtree_text(_load("s390-ccw-virtio-512M")))
    assert [(r.gpa, r.size, r.name, r.type) for r in ranges] == [
        (0, 512 << 20, "s390.ram", "ram")]


def test_names_may_hold_spaces():
    ranges = locate.parse_flatview(mtree_text(_load("pc-1G-seabios")))
    assert "vga ioports remapped" in {r.name for r in ranges}


def test_q35_ram_above_4g_has_region_offset():
    text = mtree_text(_load("q35-5G-seabios"))
    high = [r for r in locate.parse_flatview(text) if r.gpa >= 1 << 32]
    assert [(r.gpa, r.size, r.name, r.offset, r.type) for r in high] == [
        (0x1_0000_0000, 0xC000_0000, "pc.ram", 0x8000_0000, "ram")
    ]


def test_kvm_suffix_is_not_part_of_the_name():
    ranges = locate.parse_flatview(mtree_text(_load("q35-5G-seabios-kvm")))
    assert {r.name for r in ranges if r.dumped} == {"pc.ram", "vga.vram", "pc.bios"}


def test_pam_shadowed_rom_ranges_are_dumped_as_ram():
    """After the BIOS runs, PAM makes parts of 0xc0000-0xfffff read-only pc.ram."""
    ranges = locate.parse_flatview(mtree_text(_load("pc-1G-seabios")))
    low = [(r.gpa, r.type, r.name) for r in ranges if 0xC0000 <= r.gpa < 0x100000]
    assert low and {name for _, _, name in low} == {"pc.ram"}
    assert {t for _, t, _ in low} == {"ram", "rom"}


def test_other_address_space_is_not_taken():
    text = mtree_text(_load("q35-5G-seabios"))
    smm = locate.parse_flatview(text, "cpu-smm-0")
    assert smm[0].size == 0xC0000  # SMRAM view: low RAM not split by vga-lowmem.
    with pytest.raises(MonitorError, match="no flat view for address space 'nosuch'"):
        locate.parse_flatview(text, "nosuch")


@pytest.mark.parametrize("line", [
    "  0000000000000000-zzzz (prio 0, ram): pc.ram",
    "  00000000000a0000-000000000009ffff (prio 0, ram): backwards",
    "garbage",
])
def test_malformed_flatview_is_refused(line):
    text = 'FlatView #0\n AS "memory", root: system\n Root memory region: system\n' + line + "\n"
    with pytest.raises(MonitorError):
        locate.parse_flatview(text)


def test_gpa2hva_replies():
    assert locate.parse_gpa2hva(
        "Host virtual address for 0x100000000 (pc.ram) is 0x7fa013e00000\r\n"
    ) == (0x7FA013E00000, "pc.ram")
    for bad in ("Memory at address 0xa0000 is not RAM\r\n",
                "No memory is mapped at address 0x200000000\r\n", ""):
        with pytest.raises(MonitorError, match="^unexpected reply to 'gpa2hva': "):
            locate.parse_gpa2hva(bad)


def _load(name: str) -> dict:
    import json



    return json.loads((DATA / "sessions" / f"{name}.json").read_text())


# The RAM map held against QEMU's RAM blocks and mappings (locate.check_map).

def _replayed(session: dict) -> tuple[list[GuestRange], list[RamBlock]]:
    monitor = Monitor(ReplayTransport(session))
    return locate.guest_ranges(monitor, locate.flat_view(monitor)), monitor.ram_blocks()


def _qemu_maps(ranges: list[GuestRange], blocks: list[RamBlock]) -> list[Mapping]:
    """Mappings as QEMU had them: each region's block in its own anonymous mapping,
    and below them the heap and the program."""
    spans = {}
    for r in ranges:
        block = next(b for b in blocks
                     if b.name == r.region.name or b.name.endswith("/" + r.region.name))
        spans[r.region.base] = Mapping(r.region.base, r.region.base + _pages(block.total),
                                       "rw-p", 0, "")
    return [Mapping(0x5000_0000, 0x5100_0000, "r-xp", 0, "/usr/bin/qemu-system-x86_64"),
            Mapping(0x5200_0000, 0x5300_0000, "rw-p", 0, "[heap]"),
            *sorted(spans.values(), key=lambda m: m.start)]


def _pages(n: int) -> int:
    return -(-n // 0x1000) * 0x1000


def _check(ranges: list[GuestRange], blocks: list[RamBlock], maps=None) -> None:
    locate.check_map(ranges, blocks, _qemu_maps(ranges, blocks) if maps is None else maps)


def _moved(r: GuestRange, base: int) -> GuestRange:
    """``r`` as a monitor would give it that says its region starts at ``base``."""
    offset = r.hva - r.region.base
    return dataclasses.replace(r, hva=base + offset, region=locate.Region(r.name, base))


def test_recorded_maps_fit_their_blocks(session):
    ranges, blocks = _replayed(session)
    # QEMU 8.0 and later say where each block lies in QEMU; 7.2 does not.
    hosts = "version 7." not in session["qemu"]
    assert blocks and all((b.host is not None) == hosts for b in blocks)
    _check(ranges, blocks)


def test_a_bios_shown_twice_is_an_alias_not_a_fault():
    ranges, blocks = _replayed(_load("pc-1G-prelaunch"))
    bios = [r for r in ranges if r.name == "pc.bios"]
    assert len(bios) == 2 and bios[0].region == bios[1].region  # isa-bios: its last 128 KiB
    _check(ranges, blocks)


def test_ranges_of_one_region_that_disagree_on_its_place_are_refused():
    session = _load("pc-1G-seabios")
    for x in session["exchanges"]:  # One answer of gpa2hva, 1 MiB off.
        if x["arguments"] == {"command-line": "gpa2hva 0x100000"}:
            x["return"] = x["return"].replace("0x7f4493f00000", "0x7f4494000000")
    ranges, blocks = _replayed(session)
    with pytest.raises(GuestMemoryError, match="^the ranges of memory region 'pc.ram' disagree "
                                               "on where it lies in QEMU"):
        _check(ranges, blocks)


def test_a_thousand_ranges_on_one_mib_are_refused():
    """A map that shows the same MiB at 1,024 guest addresses would make a GiB of it."""
    ranges, blocks = _replayed(_load("pc-1G-seabios"))
    base = ranges[0].region.base
    fake = [GuestRange(i << 20, 1 << 20, base, locate.Region("pc.ram", base), "pc.ram")
            for i in range(1024)]
    with pytest.raises(GuestMemoryError, match="^memory region 'pc.ram': its bytes at offset "
                                               "0x0 are shown at 3 guest addresses or more"):
        _check(fake, blocks)


def test_a_range_beyond_its_block_is_refused():
    ranges, blocks = _replayed(_load("q35-5G-seabios"))
    last = max((r for r in ranges if r.name == "pc.ram"), key=lambda r: r.gpa)
    grown = [dataclasses.replace(r, size=r.size + 0x1000) if r is last else r for r in ranges]
    with pytest.raises(GuestMemoryError, match="^guest RAM at 0x100000000 .* lies beyond its "
                                               "RAM block 'pc.ram', of which 0x140000000 bytes"):
        _check(grown, blocks)


def test_a_region_without_a_block_is_refused():
    ranges, blocks = _replayed(_load("pc-1G-seabios"))
    with pytest.raises(GuestMemoryError, match="^memory region 'vga.vram' has no RAM block"):
        _check(ranges, [b for b in blocks if not b.name.endswith("vga.vram")],
               _qemu_maps(ranges, blocks))


def test_blocks_that_overlap_in_qemu_are_refused():
    ranges, blocks = _replayed(_load("pc-1G-seabios"))
    inside = ranges[0].region.base + (1 << 20)  # vga.vram said to be within pc.ram
    moved = [_moved(r, inside) if r.name == "vga.vram" else r for r in ranges]
    with pytest.raises(GuestMemoryError, match="^RAM blocks 'pc.ram' and "
                                               "'0000:00:02.0/vga.vram' would overlap in QEMU"):
        _check(moved, blocks, _qemu_maps(ranges, blocks))


@pytest.mark.parametrize("where, what", [(0x5200_0000, r"\[heap\]"),
                                         (0x5000_0000, "/usr/bin/qemu-system-x86_64")])
def test_ram_said_to_be_in_the_heap_or_the_program_is_refused(where, what):
    """All of a region moved, consistently, onto memory that is no guest RAM."""
    ranges, blocks = _replayed(_load("pc-1G-seabios"))
    moved = [_moved(r, where) if r.name == "pc.bios" else r for r in ranges]
    with pytest.raises(GuestMemoryError, match=f"^QEMU's RAM block 'pc.bios' would be at "
                                               f"{where:#x}, in {what}: not guest RAM$"):
        _check(moved, blocks, _qemu_maps(ranges, blocks))


def test_ram_said_to_be_where_qemu_maps_nothing_is_refused():
    ranges, blocks = _replayed(_load("pc-1G-seabios"))
    moved = [_moved(r, 0x10_0000_0000) if r.name == "pc.bios" else r for r in ranges]
    with pytest.raises(GuestMemoryError, match="^QEMU's RAM block 'pc.bios' .* is not mapped "
                                               "readable in QEMU at 0x1000000000$"):
        _check(moved, blocks, _qemu_maps(ranges, blocks))


# QEMU 8.0 and later show each block's host address and whether it is read-only.
RAMBLOCK_8 = (DATA / "info-ramblock-qemu-8.txt").read_text()


def test_ram_blocks_of_qemu_8():
    assert parse_ram_blocks(RAMBLOCK_8) == [
        RamBlock("pc.ram", 0x4000_0000, 0x4000_0000, 0x7FF0_AFE0_0000),
        RamBlock("0000:00:02.0/vga.vram", 0x100_0000, 0x100_0000, 0x7FF0_AE00_0000),
        RamBlock("pc.bios", 0x4_0000, 0x4_0000, 0x7FF0_AD80_0000)]


def test_ram_blocks_of_qemu_7_2():
    blocks = parse_ram_blocks(next(
        x["return"] for x in _load("pc-1G-seabios")["exchanges"]
        if x["arguments"] == {"command-line": "info ramblock"}))
    assert blocks[:2] == [RamBlock("pc.ram", 0x4000_0000, 0x4000_0000, None),
                          RamBlock("0000:00:02.0/vga.vram", 0x100_0000, 0x100_0000, None)]
    assert RamBlock("/rom@etc/acpi/tables", 0x2_0000, 0x20_0000, None) in blocks


def test_with_qemu_8s_addresses_each_region_must_start_at_its_block():
    blocks = parse_ram_blocks(RAMBLOCK_8)
    ram = locate.Region("pc.ram", 0x7FF0_AFE0_0000)
    ranges = [GuestRange(0, 0xA_0000, ram.base, ram, "pc.ram"),
              GuestRange(0x10_0000, 0x3FF0_0000, ram.base + 0x10_0000, ram, "pc.ram")]
    maps = [Mapping(ram.base, ram.base + 0x4000_0000, "rw-p", 0, "")]
    locate.check_map(ranges, blocks, maps)
    elsewhere = [_moved(r, ram.base + 0x1000) for r in ranges]
    with pytest.raises(GuestMemoryError, match="^memory region 'pc.ram' would start at "
                                               "0x7ff0afe01000 in QEMU, where QEMU has no RAM"):
        locate.check_map(elsewhere, blocks, maps)


@pytest.mark.parametrize("text", ["", "garbage", RAMBLOCK_8 + "  pc.ram 4 KiB 0x0\n"])
def test_unreadable_ramblock_replies_are_refused(text):
    unreadable = "^unexpected (line in 'info ramblock'|reply to 'info ramblock')"
    with pytest.raises(MonitorError, match=unreadable):
        parse_ram_blocks(text)


class _Timed:
    """A transport that records the time each command was allowed."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.allowed: list[tuple[str, float | None]] = []

    def execute(self, command, arguments=None, timeout=None):
        self.allowed.append((command, timeout))
        return {}

    def close(self):
        pass


@pytest.mark.parametrize("qmp_timeout, expected", [(3.0, 30.0), (120.0, 120.0)])
def test_cont_is_allowed_no_less_than_any_other_command(qmp_timeout, expected):
    transport = _Timed(qmp_timeout)
    Monitor(transport).cont()
    assert transport.allowed == [("cont", expected)]
