"""QEMU's structure layouts from DWARF, on a small C stand-in for QEMU.

tests/fixtures/qemu_like.c is built as QEMU is (two units: one defines
address_space_memory, the other FlatRange) and, run with an argument,
prints what the compiler laid out; livedump must read the same from DWARF.
"""

import dataclasses
import functools
import http.server
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from livedump.errors import DebugInfoError
from livedump.ptrace import debuginfo, dwarf
from livedump.ptrace import layout as layouts
from livedump.ptrace.debuginfo import find_debug_file
from livedump.ptrace.dwarf import load_layout, qemu_layout
from livedump.ptrace.layout import QemuLayout

FIXTURE = Path(__file__).parent / "fixtures" / "qemu_like.c"
REAL_QEMU = Path.home() / ".cache/livedump/qemu-debug/bin/qemu-system-x86_64"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("objcopy") is None,
                                reason="needs gcc and binutils to build the fixture")
needs_dwz = pytest.mark.skipif(shutil.which("dwz") is None,
                               reason="needs dwz (apt-get install dwz)")

# name: (compiler, flags). clang's DWARF 5 (names by DW_FORM_strx, the
# variable at DW_OP_addrx) takes the slow paths; with -gdwarf-aranges it
# lists the variable in .debug_aranges.
VARIANTS = {
    "int128-struct": ("gcc", []),
    "int128-scalar": ("gcc", ["-DINT128_SCALAR"]),
    "int128-hi-first": ("gcc", ["-DINT128_HI_FIRST"]),
    "dwarf4": ("gcc", ["-gdwarf-4"]),
    "dwarf2": ("gcc", ["-gdwarf-2"]),
    "dwarf64": ("gcc", ["-gdwarf64"]),
    "clang": ("clang", []),
    "clang-aranges": ("clang", ["-gdwarf-aranges", "-DINT128_SCALAR"]),
}


def build(directory: Path, *flags: str, compiler: str = "gcc") -> Path:
    """The fixture compiled like QEMU: address_space_memory in one unit, FlatRange in another."""
    directory.mkdir(parents=True, exist_ok=True)
    objects = []
    for unit, extra in (("physmem", ()), ("memory", ("-DFLATRANGE_UNIT",))):
        objects.append(str(directory / f"{unit}.o"))
        subprocess.run([compiler, "-g", "-O0", *flags, *extra, "-c", str(FIXTURE),
                        "-o", objects[-1]], check=True)
    exe = directory / "qemu"
    subprocess.run([compiler, "-g", *flags, "-Wl,--build-id", *objects, "-o", str(exe)],
                   check=True)
    return exe


@functools.cache
def built(variant: str, root: Path) -> Path:
    compiler, flags = VARIANTS[variant]
    return build(root / variant, *flags, compiler=compiler)


@pytest.fixture(scope="session")
def builds(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builds")


@pytest.fixture
def exe(builds, tmp_path) -> Path:
    """A private copy of the default build, free to strip or move."""
    return Path(shutil.copy(built("int128-struct", builds), tmp_path / "qemu"))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real caches, debug directories or debuginfod servers."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("DEBUGINFOD_URLS", "DEBUGINFOD_CACHE_PATH", "DEBUGINFOD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(debuginfo, "DEBUG_DIRS", [tmp_path / "root/usr/lib/debug"])


def expected(exe: Path) -> dict:
    """What the compiler laid out, as QemuLayout's structs and int128 are when made dicts."""
    structs: dict = {}
    int128 = {"scalar": False, "lo": None, "hi": None}
    out = subprocess.run([str(exe), "print"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        key, *numbers = line.split()
        if key == "Int128":
            int128["scalar"] = True
        elif key.startswith("Int128."):
            int128[key[7:]] = int(numbers[0])
        elif "." in key:
            name, member = key.split(".", 1)
            needed = layouts.NEEDED | layouts.CPU_NEEDED
            if member in needed[name] + layouts.CPU_OPTIONAL.get(name, ()):
                structs[name]["fields"][member] = {"offset": int(numbers[0]),
                                                   "size": int(numbers[1])}
        else:
            structs[key] = {"size": int(numbers[0]), "fields": {}}
    return {"structs": structs, "int128": int128}


def symbol(exe: Path, name: str) -> int:
    out = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.endswith(f" {name}"))


def split(exe: Path, debug: Path) -> Path:
    """Move exe's DWARF into ``debug`` as distributions do (objcopy --only-keep-debug)."""
    debug.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["objcopy", "--only-keep-debug", str(exe), str(debug)], check=True)
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    return debug


def layout_of(exe: Path) -> QemuLayout:
    return load_layout(str(exe), find_debug_file(str(exe)))


@pytest.mark.parametrize("variant", [
    pytest.param(name, marks=pytest.mark.skipif(shutil.which(compiler) is None,
                                                reason=f"needs {compiler}"))
    for name, (compiler, _) in VARIANTS.items()])
def test_layout_is_what_the_compiler_laid_out(variant, builds, monkeypatch):
    exe = built(variant, builds)
    if VARIANTS[variant][0] == "gcc":  # found by the byte search, as in QEMU
        monkeypatch.setattr(dwarf, "_scan", lambda *args: pytest.fail("slow scan used"))
    layout = layout_of(exe)
    got = dataclasses.asdict(layout)
    assert {"structs": got["structs"], "int128": got["int128"]} == expected(exe)
    assert layout.address_space_memory == symbol(exe, "address_space_memory")
    assert (layout.cpu_list, layout.no_cpu_state) == (symbol(exe, "cpus"), "")
    assert list(layout.accelerators) == ["tcg"]  # built without KVM: no kvm_allowed
    assert layout.accelerators["tcg"].address == symbol(exe, "tcg_allowed")
    assert layout.build_id == debuginfo.read_build_id(exe) and len(layout.build_id) == 40
    assert (layout.pie, layout.pointer_size, layout.byteorder) == (True, 8, "little")


def test_flatrange_is_found_in_another_unit_than_the_variable(exe):
    """As in QEMU, the unit defining the variable only declares FlatRange."""
    address = symbol(exe, "address_space_memory")
    with open(exe, "rb") as f:
        units = [list(cu.get_top_DIE().iter_children())
                 for cu in ELFFile(f).get_dwarf_info().iter_CUs()]
        [defining] = [top for top in units if any(dwarf._is_variable_at(d, address) for d in top)]
        flatranges = [d for d in defining if d.tag == "DW_TAG_structure_type"
                      and d.attributes.get("DW_AT_name")
                      and d.attributes["DW_AT_name"].value == b"FlatRange"]
        assert [("DW_AT_declaration" in d.attributes) for d in flatranges] == [True]
    assert layout_of(exe).structs["FlatRange"]["addr"].size == 32


def test_slow_scan_finds_what_the_byte_search_misses(exe, monkeypatch):
    """Other toolchains (clang's DW_OP_addrx, DW_FORM_strx names) leave only a scan."""
    fast = layout_of(exe)
    monkeypatch.setattr(layouts, "layout_cache_dir", lambda: exe.parent / "other-cache")
    monkeypatch.setattr(dwarf, "_variable_units", lambda *args: iter(()))
    monkeypatch.setattr(dwarf._Dwarf, "name_refs", lambda self, name: [])
    assert layout_of(exe) == fast


def test_abbreviation_codes_of_several_bytes():
    """A DIE starts with a ULEB128 code; where it may start, seen from its name's offset."""
    data = bytes([0x05, 0x81, 0x01, 0xAA, 0x90, 0x80, 0x02, 0xAA])
    assert list(dwarf._uleb_starts(data, 3, 0)) == [2, 1]  # 0x05 ends another ULEB
    assert [dwarf._uleb(data, at) for at in (2, 1)] == [1, 129]
    assert list(dwarf._uleb_starts(data, 7, 0)) == [6, 5, 4]
    assert dwarf._uleb(data, 4) == 0x90 - 0x80 + (2 << 14)
    assert list(dwarf._uleb_starts(data, 3, 2)) == [2]
    assert list(dwarf._uleb_starts(data, 4, 0)) == []


def test_compressed_debug_sections(exe):
    plain = layout_of(exe)
    subprocess.run(["objcopy", "--compress-debug-sections=zlib", str(exe)], check=True)
    assert dwarf._read_layout(str(exe), exe, plain.build_id) == plain


@needs_dwz
def test_dwz_common_file_as_in_debian_dbgsym(exe, tmp_path):
    """Debian's -dbgsym packages are dwz'd: types and strings in a common file."""
    plain = layout_of(exe)
    debug = split(exe, tmp_path / "debug/qemu.debug")
    twin = Path(shutil.copy(debug, tmp_path / "debug/twin.debug"))
    common = tmp_path / "dwz/common.debug"
    common.parent.mkdir()
    subprocess.run(["dwz", "-m", str(common), "-M", str(common), str(debug), str(twin)],
                   check=True)
    assert dwarf._read_layout(str(exe), debug, plain.build_id) == plain

    alt_id = debuginfo.read_build_id(common)
    by_id = debuginfo.DEBUG_DIRS[0] / ".build-id" / alt_id[:2] / f"{alt_id[2:]}.debug"
    by_id.parent.mkdir(parents=True)
    common.rename(by_id)
    assert dwarf._read_layout(str(exe), debug, plain.build_id) == plain
    by_id.unlink()
    with pytest.raises(DebugInfoError, match="keeps part of its DWARF in .*common.debug"):
        dwarf._read_layout(str(exe), debug, plain.build_id)


@needs_dwz
def test_dwz_common_file_without_debug_info_is_named(exe, tmp_path):
    build_id = layout_of(exe).build_id
    debug = split(exe, tmp_path / "debug/qemu.debug")
    twin = Path(shutil.copy(debug, tmp_path / "debug/twin.debug"))
    common = tmp_path / "debug/common.debug"
    subprocess.run(["dwz", "-m", str(common), "-M", str(common), str(debug), str(twin)],
                   check=True)
    subprocess.run(["objcopy", "--remove-section", ".debug_info", str(common)], check=True)
    with pytest.raises(DebugInfoError, match=r"common\.debug has no \.debug_info section"):
        dwarf._read_layout(str(exe), debug, build_id)


@needs_dwz
def test_dwz_single_file(exe):
    plain = layout_of(exe)
    subprocess.run(["dwz", str(exe)], check=True)
    assert dwarf._read_layout(str(exe), exe, plain.build_id) == plain


def test_member_missing_from_this_qemu_is_named(exe, monkeypatch):
    monkeypatch.setitem(layouts.NEEDED, "RAMBlock", (*layouts.NEEDED["RAMBlock"], "page_shift"))
    with pytest.raises(DebugInfoError, match="QEMU's RAMBlock has no member page_shift"):
        layout_of(exe)


def test_qemu_of_another_target_maps_memory_without_registers(tmp_path):
    layout = layout_of(build(tmp_path, "-DOTHER_TARGET"))
    assert (layout.cpu_list, layout.no_cpu_state) == (
        None, "QEMU's CPUs are not x86 ones (ptrace mode reads x86 registers only)")
    assert set(layouts.NEEDED) <= set(layout.structs)
    assert QemuLayout.from_json(layout.to_json()) == layout


def test_program_that_is_not_qemu(tmp_path):
    (tmp_path / "true.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-g", "-o", str(tmp_path / "true"), str(tmp_path / "true.c")],
                   check=True)
    with pytest.raises(DebugInfoError, match="no symbol address_space_memory"):
        layout_of(tmp_path / "true")


# --- finding the debug file ----------------------------------------------------


def test_exe_with_dwarf_is_its_own_debug_file(exe):
    assert find_debug_file(str(exe)) == exe


def test_explicit_debug_file(exe, tmp_path):
    debug = split(exe, tmp_path / "elsewhere/q.debug")
    assert find_debug_file(str(exe), str(debug)) == debug
    assert load_layout(str(exe), debug).structs["AddressSpace"]["current_map"].offset == 32


def test_debug_file_of_another_build_is_refused(exe, builds):
    other = built("int128-scalar", builds)
    with pytest.raises(DebugInfoError, match="build-id .* not of the running QEMU's .*refusing"):
        find_debug_file(str(exe), str(other))
    with pytest.raises(DebugInfoError, match="refusing"):
        load_layout(str(exe), other)


def test_explicit_file_without_dwarf_is_refused(exe, tmp_path):
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    with pytest.raises(DebugInfoError, match="has no DWARF"):
        find_debug_file(str(exe), str(exe))
    (tmp_path / "junk").write_text("not ELF")
    with pytest.raises(DebugInfoError, match="not a usable ELF file"):
        find_debug_file(str(exe), str(tmp_path / "junk"))


def test_separate_debug_file_by_build_id(exe):
    build_id = debuginfo.read_build_id(exe)
    before = dwarf._read_layout(str(exe), exe, build_id)
    place = debuginfo.DEBUG_DIRS[0] / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    split(exe, place)
    assert find_debug_file(str(exe)) == place
    assert layout_of(exe) == before


def test_file_at_build_id_path_of_another_build_is_refused(exe, builds):
    build_id = debuginfo.read_build_id(exe)
    place = debuginfo.DEBUG_DIRS[0] / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    place.parent.mkdir(parents=True)
    shutil.copy(built("int128-scalar", builds), place)
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    with pytest.raises(DebugInfoError, match="refusing"):
        find_debug_file(str(exe))


@pytest.mark.parametrize("where", ["beside", ".debug", "debug-dir"])
def test_gnu_debuglink(exe, tmp_path, where):
    debug = split(exe, tmp_path / "qemu.debug")
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(exe)], check=True)
    place = {"beside": debug, ".debug": tmp_path / ".debug/qemu.debug",
             "debug-dir": debuginfo.DEBUG_DIRS[0] / tmp_path.relative_to("/") / "qemu.debug"}[where]
    if place != debug:
        place.parent.mkdir(parents=True)
        debug.rename(place)
    assert find_debug_file(str(exe)) == place
    assert load_layout(str(exe), place).structs["RAMBlock"]["host"].size == 8


def test_gnu_debuglink_with_wrong_crc_is_skipped(exe, tmp_path):
    debug = split(exe, tmp_path / "qemu.debug")
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(exe)], check=True)
    with open(debug, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DebugInfoError, match="does not match the CRC in .gnu_debuglink"):
        find_debug_file(str(exe))


def test_no_debug_info_says_how_to_get_it(exe):
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    with pytest.raises(DebugInfoError) as e:
        find_debug_file(str(exe))
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 11
    for hint in ("-dbgsym", "DEBUGINFOD_URLS", "--debug-file", debuginfo.read_build_id(exe)):
        assert hint in message


# --- the layout cache ------------------------------------------------------------


def cache_file(exe: Path) -> Path:
    return layouts.layout_cache_dir() / f"{debuginfo.read_build_id(exe)}.json"


def test_second_load_reads_the_cache(exe, monkeypatch):
    first = layout_of(exe)
    assert QemuLayout.from_json(cache_file(exe).read_text()) == first
    monkeypatch.setattr(dwarf, "_read_layout", lambda *args: pytest.fail("DWARF read again"))
    assert layout_of(exe) == first


@pytest.mark.parametrize("damage", [
    "{not json", "", '{"format": 1}', "[]",
    lambda text: text.replace('"offset": 0', '"offset": "0"'),
    lambda text: text.replace('"format": 1', '"format": 99'),
])
def test_damaged_cache_is_rebuilt(exe, damage):
    good = layout_of(exe)
    text = cache_file(exe).read_text()
    cache_file(exe).write_text(damage(text) if callable(damage) else damage)
    assert layout_of(exe) == good
    assert cache_file(exe).read_text() == text


def test_cached_layout_needs_no_debug_info(exe):
    """Once cached, a run needs no debug file: it may be gone, or slow to find."""
    layout = qemu_layout(str(exe))
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    assert qemu_layout(str(exe)) == layout
    cache_file(exe).unlink()
    with pytest.raises(DebugInfoError, match="no debug info"):
        qemu_layout(str(exe))


def test_unwritable_cache_only_costs_time(exe, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the cache directory should be")
    assert layout_of(exe).structs["FlatView"]["nr"].size == 4


def test_layout_json_round_trip(exe):
    layout = layout_of(exe)
    assert QemuLayout.from_json(layout.to_json()) == layout


# --- debuginfod --------------------------------------------------------------------


class Server:
    """A debuginfod stand-in: http.server over a directory, counting requests."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "srv").mkdir()
    s = Server(tmp_path / "srv")
    yield s
    s.close()


def serve(server_root: Path, debug: Path, build_id: str) -> None:
    place = server_root / "buildid" / build_id / "debuginfo"
    place.parent.mkdir(parents=True)
    shutil.copy(debug, place)


def test_debuginfod_download_is_cached_like_elfutils(exe, tmp_path, server, monkeypatch):
    build_id = debuginfo.read_build_id(exe)
    serve(tmp_path / "srv", split(exe, tmp_path / "q.debug"), build_id)
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    monkeypatch.setenv("DEBUGINFOD_URLS", f"{dead} {server.url}/")
    found = find_debug_file(str(exe))
    assert found == tmp_path / "xdg-cache/debuginfod_client" / build_id / "debuginfo"
    assert stat.S_IMODE(found.stat().st_mode) == 0o400
    assert found.read_bytes() == (tmp_path / "q.debug").read_bytes()
    assert server.requests == [f"/buildid/{build_id}/debuginfo"]
    assert find_debug_file(str(exe)) == found and len(server.requests) == 1
    assert load_layout(str(exe), found).structs["FlatRange"]["mr"].offset == 0


def test_debuginfod_not_found_is_remembered(exe, tmp_path, server, monkeypatch):
    build_id = debuginfo.read_build_id(exe)
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    monkeypatch.setenv("DEBUGINFOD_URLS", server.url)
    monkeypatch.setenv("DEBUGINFOD_CACHE_PATH", str(tmp_path / "dcache"))
    with pytest.raises(DebugInfoError, match=f"{server.url}: HTTP 404"):
        find_debug_file(str(exe))
    miss = tmp_path / "dcache" / build_id / "debuginfo"
    assert miss.stat().st_size == 0
    with pytest.raises(DebugInfoError, match="remembered"):
        find_debug_file(str(exe))
    assert len(server.requests) == 1
    (tmp_path / "dcache/cache_miss_s").write_text("0")
    os.utime(miss, (1, 1))
    with pytest.raises(DebugInfoError, match="HTTP 404"):
        find_debug_file(str(exe))
    assert len(server.requests) == 2


def test_debuginfod_file_of_another_build_is_refused(exe, builds, tmp_path, server, monkeypatch):
    build_id = debuginfo.read_build_id(exe)
    serve(tmp_path / "srv", built("int128-scalar", builds), build_id)
    subprocess.run(["objcopy", "--strip-debug", str(exe)], check=True)
    monkeypatch.setenv("DEBUGINFOD_URLS", server.url)
    with pytest.raises(DebugInfoError, match="sent something that is not build-id"):
        find_debug_file(str(exe))
    # Not kept: the next run asks the server again.
    assert not (debuginfo.debuginfod_cache_dir() / build_id / "debuginfo").exists()


def test_debuginfod_cache_dir_follows_elfutils(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert debuginfo.debuginfod_cache_dir() == home / ".cache/debuginfod_client"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert debuginfo.debuginfod_cache_dir() == tmp_path / "xdg/debuginfod_client"
    (home / ".debuginfod_client_cache").mkdir(parents=True)
    assert debuginfo.debuginfod_cache_dir() == home / ".debuginfod_client_cache"
    monkeypatch.setenv("DEBUGINFOD_CACHE_PATH", str(tmp_path / "explicit"))
    assert debuginfo.debuginfod_cache_dir() == tmp_path / "explicit"


# --- the real QEMU ----------------------------------------------------------------


@pytest.mark.skipif(not REAL_QEMU.exists(), reason=f"no debug build of QEMU at {REAL_QEMU} "
                    "(made by integration/build-qemu-debug.sh)")
def test_real_qemu_7_2_debug_build():
    layout = layout_of(REAL_QEMU)
    assert layout.structs["FlatRange"]["mr"].offset == 0
    assert layout.structs["AddressSpace"]["current_map"].offset == 32
    assert layout.int128.scalar
    assert layout.structs["RAMBlock"]["host"].offset == 24
    assert layout.address_space_memory == symbol(REAL_QEMU, "address_space_memory")
