"""Which architecture a vmcore gets: --arch, QEMU's judgement, or the target's default."""

from typing import Any

import pytest

from livedump.dump import _arch, _target
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


@pytest.mark.parametrize("aarch64_cpu, name, assumed", [
    (True, "aarch64-le", "an AArch64 CPU model, little-endian assumed"),
    (False, "arm-le", "an AArch32 CPU model, little-endian assumed"),
])
def test_the_cpu_model_decides_aarch64_or_aarch32(aarch64_cpu, name, assumed):
    default = arches.for_target("aarch64", aarch64_cpu)
    assert (default.arch.name, default.arch.bits, default.assumed) == (
        name, 64 if aarch64_cpu else 32, assumed)
    arch, source, _ = _arch(None, default, NoCpuNotes("no CPU registers with --no-pause"))
    assert (arch.name, source) == (name, f"QEMU target aarch64, {assumed} (else give --arch)")


def test_a_cpu_kind_that_cannot_be_told_is_refused_not_guessed():
    unknown = arches.unknown_cpu("aarch64", "its CPU model did not say: timeout")
    with pytest.raises(UsageError, match=r"^cannot tell which kind of CPU QEMU target aarch64 "
                       r"runs without its registers \(its CPU model did not say: timeout\): "
                       r"give --arch, or let livedump pause the guest$"):
        _arch(None, unknown, NoCpuNotes("no CPU registers with --no-pause"))
    # QEMU's notes tell: nothing is guessed.
    assert _arch(None, unknown, QEMU_386)[0].name == "386"


@pytest.mark.parametrize("target, arch", [
    ("x86_64", "x86_64"), ("x86_64", "386"), ("i386", "386"), ("aarch64", "arm-be"),
    ("aarch64", "aarch64-be"), ("ppc64", "ppc64-be"), ("ppc", "ppc-le"), ("arm", "arm-be"),
    ("sparc64", "x86_64"),  # a target livedump does not know: nothing to say
])
def test_arch_that_qemus_dump_of_the_target_can_have_is_no_contradiction(target, arch):
    assert arches.contradiction(arches.lookup(arch), target) == ""


@pytest.mark.parametrize("target, arch, theirs", [
    ("x86_64", "ppc64-le", "x86_64 or 386"),
    ("i386", "x86_64", "386"),
    ("arm", "aarch64-le", "arm-le or arm-be"),
    ("ppc64", "ppc-be", "ppc64-le or ppc64-be"),
    ("riscv64", "riscv32", "riscv64"),
])
def test_arch_beyond_the_targets_dumps_is_named_a_contradiction(target, arch, theirs):
    assert arches.contradiction(arches.lookup(arch), target) == (
        f"--arch {arch} contradicts QEMU target {target}, whose vmcores are {theirs}: "
        "the vmcore says a machine the guest is not")


def test_every_target_can_be_its_own_default_and_has_its_dumps_listed():
    assert set(arches._TARGET_ARCHES) == set(arches._TARGET_DEFAULTS)
    for target in arches._TARGET_DEFAULTS:
        assert arches.contradiction(arches.for_target(target).arch, target) == ""
        assert arches.contradiction(arches.for_target(target, False).arch, target) == ""


class _UnnamedQemu:
    """A ptrace session whose QEMU binary names no target and whose debug info
    holds no x86 CPU state."""

    def target_arch(self) -> str:
        raise UsageError("cannot tell which architecture qemu-custom emulates: give --arch")


def test_arch_given_needs_no_target():
    session: Any = _UnnamedQemu()
    assert _target(session, arches.lookup("aarch64-le")) == ""
    with pytest.raises(UsageError, match="give --arch"):
        _target(session, None)
