"""Which architecture a vmcore gets: --arch, QEMU's judgement, or the target's default."""

import pytest

from livedump.dump import _arch
from livedump.errors import UsageError
from livedump.vmcore import arch as arches
from livedump.vmcore.notes import NoCpuNotes, parse

from .conftest import DATA

# QEMU 7.2's own notes for a pc guest idling in SeaBIOS: EM_386, ELF64.
QEMU_386 = parse((DATA / "qemu-7.2-pc-1G-one-page.vmcore").read_bytes())


@pytest.mark.parametrize("target, name, assumed", [
    ("x86_64", "x86_64", "long mode assumed"),
    ("i386", "386", ""),
    ("aarch64", "aarch64-le", "an AArch64 CPU, little-endian, assumed"),
    ("arm", "arm-le", "little-endian assumed"),
    ("ppc64", "ppc64-le", "little-endian assumed"),
    ("s390x", "s390", ""),
    ("riscv64", "riscv64", ""),
    ("riscv32", "riscv32", ""),
    ("ppc", "ppc-be", "big-endian assumed"),
])
def test_target_defaults(target, name, assumed):
    default = arches.for_target(target)
    assert (default.arch.name, default.assumed) == (name, assumed)
    if assumed:
        assert str(default) == f"QEMU target {target}, {assumed} (else give --arch)"
    else:
        assert str(default) == f"QEMU target {target}"


def test_unsupported_target_is_named():
    with pytest.raises(UsageError, match="QEMU target 'sparc64' is not one livedump supports"):
        arches.for_target("sparc64")


def test_qemus_judgement_wins_over_the_target():
    arch, source, notes = _arch(None, arches.for_target("x86_64"), QEMU_386)
    assert (arch.name, arch.bits, source, notes) == ("386", 64, "QEMU's, from the CPU state",
                                                     QEMU_386)


def test_arch_agreeing_with_qemu_keeps_its_notes_and_class():
    arch, source, notes = _arch(arches.lookup("i386"), None, QEMU_386)
    assert (arch.bits, source, notes) == (64, "--arch", QEMU_386)


def test_arch_disagreeing_with_qemu_drops_its_notes():
    arch, source, notes = _arch(arches.lookup("x86_64"), None, QEMU_386)
    assert (arch.name, source) == ("x86_64", "--arch")
    assert notes == NoCpuNotes("QEMU's CPU notes are for 386, not --arch x86_64")


def test_without_notes_the_target_decides_and_says_what_it_assumed():
    why = "no CPU registers with --no-pause"
    arch, source, notes = _arch(None, arches.for_target("aarch64"), why)
    assert (arch.name, notes) == ("aarch64-le", why)
    assert source == ("QEMU target aarch64, an AArch64 CPU, little-endian, assumed "
                      "(else give --arch)")
    arch, source, _ = _arch(arches.lookup("aarch64-be"), None, why)
    assert (arch.name, source) == ("aarch64-be", "--arch")
