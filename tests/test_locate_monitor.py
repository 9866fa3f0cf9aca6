"""The monitor-based RAM map, on monitor sessions recorded from QEMU 7.2."""

import pytest

from livedump import locate_monitor as locate
from livedump.coalesce import coalesce
from livedump.errors import MonitorError
from livedump.monitor import Monitor

from .conftest import ReplayTransport


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
    assert all(a.gpa + a.size <= b.gpa for a, b in zip(ranges, ranges[1:]))


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
        with pytest.raises(MonitorError, match="unexpected 'gpa2hva' reply"):
            locate.parse_gpa2hva(bad)


def _load(name: str) -> dict:
    import json

    from .conftest import DATA

    return json.loads((DATA / "sessions" / f"{name}.json").read_text())
