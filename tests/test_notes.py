"""QEMU's notes, from one-page dumps QEMU 7.2 wrote (tests/data/*-one-page.vmcore:
dump-guest-memory of 4 KiB at 1 MiB of a paused firmware-only guest)."""

import glob
import io
import os
import stat
import subprocess
import time

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_CORE_NOTE_N_TYPE

from livedump.dump import provenance_note
from livedump.errors import MonitorError, UsageError
from livedump.qmp.notes import from_pipe, private_file
from livedump.vmcore.arch import Arch, from_elf
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout, read_core, read_notes
from livedump.vmcore.notes import parse

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
    with pytest.raises(UsageError, match="e_machine 8"):
        from_elf(8, 64, False)  # EM_MIPS


def test_an_identity_livedump_cannot_write_is_refused_not_guessed():
    """QEMU's dump says what the VM is: no falling back to the target's default
    (as a MonitorError would), which would write it as another architecture."""
    loongarch = Arch("loongarch64", 64, "little", 258)  # QEMU 10.0 dumps it so.
    core = CoreLayout(loongarch, [Block(0, 0x1000, 0)], [provenance_note(1)]).header
    with pytest.raises(UsageError, match="^QEMU dumps this VM as ELF64 e_machine 258 "
                                         "little-endian, an architecture livedump cannot "
                                         "write$"):
        parse(core)


# One-page dumps of the machines of integration/test_arches.py
# (integration/capture_sessions.py): (name, bits, byte order) QEMU judged.
ARCH_PAGES = {
    "pc-i386-512M-pflash": ("386", 32, "little"),
    "virt-aarch64-512M": ("aarch64-be", 64, "big"),
    "pseries-512M": ("ppc64-be", 64, "big"),
    "powernv9-1G": ("ppc64-le", 64, "little"),
    "s390-ccw-virtio-512M": ("s390", 64, "big"),
    "virt-arm-256M": ("arm-be", 32, "big"),
    "virt-aarch64-cortex-a15-256M": ("arm-le", 32, "little"),  # AArch32 on qemu-system-aarch64
    "virt-riscv64-256M": ("riscv64", 64, "little"),
    "virt-riscv32-256M": ("riscv32", 32, "little"),
    "g3beige-256M": ("ppc-le", 32, "little"),  # MSR.ILE set
}


@pytest.mark.parametrize("name", ARCH_PAGES)
def test_every_arch_notes_go_verbatim_into_a_vmcore_of_their_kind(name):
    qemu = (DATA / "sessions" / f"{name}-one-page.vmcore").read_bytes()
    notes = parse(qemu)
    assert (notes.arch.name, notes.arch.bits, notes.arch.byteorder) == ARCH_PAGES[name]
    elf = parse_layout(CoreLayout(notes.arch, [Block(0, 0x1000, 0)],
                                  [notes, provenance_note(1)]))
    assert elf.elfclass == notes.arch.bits and elf.little_endian == notes.arch.little_endian
    # Read back in the vmcore's byte order: QEMU's owners and types, then ours.
    assert note_list(elf)[:-1] == note_list(ELFFile(io.BytesIO(qemu)))
    assert note_list(elf)[0] == ("CORE", "NT_PRSTATUS")


def note_list(elf: ELFFile) -> list[tuple[str, object]]:
    return [(n["n_name"], n["n_type"]) for n in next(
        s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE").iter_notes()]


class DumpIntoPipe:
    """A stand-in for libvirt's memory-only dump: a vmcore QEMU wrote, then memory
    without end, written into the path it is given until the reader goes away."""

    def __init__(self, core: bytes) -> None:
        self.core = core
        self.written = 0
        self.broken = False

    def __call__(self, path: str) -> None:
        with open(path, "wb", buffering=0) as f:
            try:
                for i in range(0, len(self.core), 100):  # Header, notes in small writes.
                    self.written += f.write(self.core[i:i + 100])
                while True:
                    self.written += f.write(bytes(4096))
            except BrokenPipeError:
                self.broken = True
                raise


@pytest.mark.parametrize("name", ["pc-1G", "q35-5G-smp2"])
def test_notes_from_a_dump_cut_short(name):
    core = (DATA / f"qemu-7.2-{name}-one-page.vmcore").read_bytes()
    writer = DumpIntoPipe(core)
    told: list[str | None] = []
    assert from_pipe(writer, watch=told.append) == parse(core)
    # The dump ended at a write after the notes: little more than a pipe's worth.
    assert writer.broken and writer.written < len(core) + (1 << 20)
    # The guardian was told the FIFO while it was there; it and its directory are gone.
    assert len(told) == 2 and told[1] is None
    assert not os.path.exists(os.path.dirname(told[0]))


def test_a_dump_that_never_starts_says_why():
    def refuse(path: str) -> None:
        raise MonitorError("libvirt could not dump domain x: no space")

    with pytest.raises(MonitorError, match="no dump came through the pipe .*no space"):
        from_pipe(refuse)


def test_a_pipe_of_garbage_is_a_monitor_error():
    with pytest.raises(MonitorError, match="not a vmcore livedump can read"):
        from_pipe(DumpIntoPipe(b"not an ELF file at all" * 100))


@pytest.mark.parametrize("path", sorted(DATA.glob("**/*one-page.vmcore")), ids=lambda p: p.name)
def test_our_note_reader_agrees_with_pyelftools(path):
    qemu = path.read_bytes()
    found = read_core(qemu)
    span = qemu[found.note_offset : found.note_offset + found.note_size]
    ours = [(n.name, n.type, n.desc) for n in read_notes(found.structs, span)]
    segment = next(s for s in ELFFile(io.BytesIO(qemu)).iter_segments()
                   if s["p_type"] == "PT_NOTE")
    theirs = [(n["n_name"], n["n_type"], n["n_descdata"]) for n in segment.iter_notes()]
    assert len(ours) == len(theirs) > 0
    for (name, kind, desc), (their_name, their_kind, their_desc) in zip(ours, theirs, strict=True):
        assert name == their_name and desc == their_desc
        assert kind == ENUM_CORE_NOTE_N_TYPE.get(their_kind, their_kind)


def leftovers(pid: int) -> list[str]:
    return glob.glob(f"/proc/{pid}/root/tmp/livedump-notes-*")


def test_a_private_file_for_qemu_is_made_private_and_removed():
    """For QEMU's one-page dump where no descriptor can pass: here, for ourselves."""
    told: list[str | None] = []
    before = leftovers(os.getpid())
    old_umask = os.umask(0o777)  # Modes are set, whatever the umask.
    try:
        with private_file(os.getpid(), told.append) as (path, fd):
            ours = told[0]
            assert ours is not None and ours.endswith(path)  # Seen through /proc/PID/root.
            assert path.startswith("/tmp/livedump-notes-") and path.endswith("/notes")
            assert stat.S_IMODE(os.stat(os.path.dirname(ours)).st_mode) == 0o700
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 and os.fstat(fd).st_size == 0
            with open(ours, "wb") as f:  # QEMU writes by name...
                f.write(b"QEMU's dump")
            assert os.pread(fd, 100, 0) == b"QEMU's dump"  # ...livedump reads by descriptor.
    finally:
        os.umask(old_umask)
    assert told == [ours, None]
    assert not os.path.exists(os.path.dirname(ours))
    assert leftovers(os.getpid()) == before
    with pytest.raises(OSError):
        os.fstat(fd)  # Closed.


def test_a_private_file_is_removed_whatever_ends_its_use():
    before = leftovers(os.getpid())
    with pytest.raises(KeyboardInterrupt), private_file(os.getpid()) as (path, _):
        raise KeyboardInterrupt
    assert leftovers(os.getpid()) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_private_file_belongs_to_qemus_user():
    """QEMU run as another user (-runas) can write the file, and only that user."""
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{other.pid}").st_uid != 65534:  # Until setpriv has run.
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.01)
        with private_file(other.pid) as (path, fd):
            ours = f"/proc/{other.pid}/root{path}"
            for name in (ours, os.path.dirname(ours)):
                assert (os.stat(name).st_uid, os.stat(name).st_gid) == (65534, 65534)
    finally:
        other.kill()
        other.wait()

