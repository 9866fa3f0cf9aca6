"""--via ptrace end to end, in seconds: a C program with QEMU's structures
(tests/fixtures/qemu_like.c "serve") plants a flat view and two vCPUs and
idles; livedump freezes it, maps it through its DWARF and dumps exactly the
planted RAM, with the planted registers in QEMU's notes."""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from livedump.errors import UsageError
from livedump.ptrace import cpu_state, ram_map
from livedump.ptrace.dwarf import qemu_layout
from livedump.ptrace.freeze import frozen
from livedump.ptrace.session import PtraceSession
from livedump.transfer.memory import ProcessMemory, read_maps
from livedump.vmcore.blocks import coalesce
from livedump.vmcore.x86_notes import Segment, X86State, qemu_notes

from .test_dwarf import built

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@contextlib.contextmanager
def serving(exe: Path) -> Iterator[tuple[subprocess.Popen, list[tuple[int, ...]]]]:
    """The fake QEMU ``exe``, serving; and the RAM it planted."""
    proc = subprocess.Popen([str(exe), "serve"], stdout=subprocess.PIPE, text=True)
    try:
        planted = []
        for line in proc.stdout:
            if line.strip() == "READY":
                break
            _, gpa, size, host, fill = line.split()
            planted.append((int(gpa, 16), int(size, 16), int(host, 16), int(fill)))
        yield proc, planted
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["int128-struct", "int128-scalar"])
def fake_qemu(request, tmp_path_factory, tmp_path):
    # Named as livedump expects a QEMU to be; its DWARF is in the binary itself.
    exe = tmp_path / "qemu-system-x86_64"
    shutil.copy(built(request.param, tmp_path_factory.mktemp("builds")), exe)
    with serving(exe) as served:
        yield served


def test_ranges_found_through_dwarf(fake_qemu):
    proc, planted = fake_qemu
    layout = qemu_layout(f"/proc/{proc.pid}/exe")
    bias = ram_map.load_bias(proc.pid, layout, read_maps(proc.pid))
    with ProcessMemory(proc.pid) as memory, frozen(proc.pid):
        ranges = ram_map.guest_ranges(memory, layout, bias)
    # MMIO, the RAM device and the non-volatile range are left out, as QEMU does.
    assert [(r.name, r.gpa, r.size) for r in ranges] == [
        ("ram.low", 0, 0x10000), ("ram.low", 0x10000, 0x10000), ("ram.high", 1 << 32, 0x10000)]
    assert [(b.gpa, b.size, b.hva) for b in coalesce(ranges)] == [p[:3] for p in planted]


def planted_cpu(c: int) -> X86State:
    """The registers qemu_like.c's plant_cpu(c) sets."""
    def segment(k: int) -> Segment:
        return Segment(8 * k + c, 0xFFFFF00000000000 + 0x100000 * k + c, 0xFFFF0 + k,
                       0xC09300 + 0x10 * k + c)
    return X86State(
        index=c, regs=tuple(0x0101010101010101 * (c + 1) + i for i in range(16)),
        rip=0xFFFFFFFF81000000 + c, rflags=0x246 + c, segs=tuple(map(segment, range(6))),
        ldt=segment(6), tr=segment(7), gdt=segment(8), idt=segment(9),
        cr=tuple(0x1000 * (i + 1) + c for i in range(5)), efer=0xD01,
        kernel_gs_base=0xFFFF888000000000 + c)


def test_cpus_found_through_dwarf(fake_qemu):
    proc, _ = fake_qemu
    layout = qemu_layout(f"/proc/{proc.pid}/exe")
    bias = ram_map.load_bias(proc.pid, layout, read_maps(proc.pid))
    with ProcessMemory(proc.pid) as memory, frozen(proc.pid):
        assert cpu_state.accelerator(memory, layout, bias) == "tcg"
        cpus = cpu_state.read_cpus(memory, layout, bias)
    assert [c.state for c in cpus] == [planted_cpu(0), planted_cpu(1)]
    assert [c.running for c in cpus] == [False, True]
    assert [c.synced for c in cpus] == [False, False]


def test_livedump_dumps_the_planted_bytes(fake_qemu, tmp_path):
    proc, planted = fake_qemu
    out = tmp_path / "fake.vmcore"
    r = subprocess.run([sys.executable, "-m", "livedump", "--pid", str(proc.pid), "--via",
                        "ptrace", "--json", str(out)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["arch"] == "x86_64"  # the first vCPU is in long mode
    assert "from QEMU's memory" in report["cpu_notes"]
    assert "1 of 2 vCPUs were executing guest code" in report["cpu_notes"]
    with open(out, "rb") as f:
        elf = ELFFile(f)
        segments = list(elf.iter_segments())
        loads = [s for s in segments if s["p_type"] == "PT_LOAD"]
        assert [(s["p_paddr"], s["p_filesz"]) for s in loads] == [p[:2] for p in planted]
        for s, (_, size, _, fill) in zip(loads, planted, strict=True):
            assert s.data() == bytes([fill]) * size
        expected = qemu_notes([planted_cpu(0), planted_cpu(1)], [], "").data
        assert segments[0].data().startswith(expected)
        assert (elf.elfclass, elf["e_machine"]) == (64, "EM_X86_64")
    # Running again, no thread left stopped.
    with open(f"/proc/{proc.pid}/stat") as f:
        assert f.read().rpartition(")")[2].split()[0] in ("S", "R")
    assert os.path.exists(f"/proc/{proc.pid}")


def test_target_of_a_qemu_of_unknown_name_comes_from_its_dwarf(tmp_path, tmp_path_factory):
    exe = tmp_path / "qemu-system-custom"
    shutil.copy(built("int128-struct", tmp_path_factory.mktemp("builds")), exe)
    with serving(exe) as (proc, _):
        session = PtraceSession(proc.pid, None, "test")
        assert session.target_arch() == "x86_64"  # 16 registers in its CPUArchState
        # Without x86 CPU state in its DWARF, nothing says: --arch is asked for.
        session.layout = dataclasses.replace(session.layout, cpu_list=None)
        with pytest.raises(UsageError, match="^cannot tell which architecture "
                                             "qemu-system-custom emulates: give --arch$"):
            session.target_arch()
