"""Every ELF identity QEMU's dump can have, on Debian's emulators under TCG.

Each platform's firmware (integration/firmware.py) puts the first CPU in
the state QEMU reads for the class, byte order and machine; the vmcore
must then agree with QEMU's own dump-guest-memory of the same paused VM
in all of them, in its notes, its PT_LOAD list and every byte of memory.
"""

import json
import re
from pathlib import Path

import pytest

from livedump.vmcore.arch import TargetDefault, for_target

from .conftest import livedump
from .firmware_more import MORE_ARCH_PLATFORMS
from .test_dump import assert_markers
from .vm import ARCH_PLATFORMS, VM, Marker, Platform
from .vmcore import first_difference, identity

MiB = 1 << 20
MEMORY = 512 * MiB
MEMORY_OF = {"ppc64-le": 1024 * MiB}  # powernv refuses less than 1 GiB

# What QEMU's dump header says for each platform: (class, little-endian, e_machine).
# Written out rather than read from QEMU, so a firmware that fails to reach
# its state fails the test even though both dumps would agree.
EXPECTED = {
    "x86_64": (64, True, "EM_X86_64"),
    "386-elf64": (64, True, "EM_386"),
    "386-elf32": (32, True, "EM_386"),
    "aarch64-le": (64, True, "EM_AARCH64"),
    "aarch64-be": (64, False, "EM_AARCH64"),
    "ppc64-le": (64, True, "EM_PPC64"),
    "ppc64-be": (64, False, "EM_PPC64"),
    "s390": (64, False, "EM_S390"),
}


LPCR_ILE = 1 << 25


def lpcr(vm: VM) -> int:
    """The first CPU's LPCR, as the monitor shows it."""
    text = vm.command("human-monitor-command", **{"command-line": "info registers"})
    return int(re.search(r"\bLPCR ([0-9a-f]+)", text)[1], 16)


def markers(platform: Platform, memory: int) -> list[Marker]:
    """Marker bytes clear of what the machines put in RAM (device trees at the
    start of RAM on virt, 16 MiB on powernv, below the top MiB on pseries)."""
    base = platform.ram_base
    return [
        Marker(base + 2 * MiB, b"livedump marker: 2 MiB into RAM"),
        Marker(base + 128 * MiB, bytes(range(256)) * 256),
        Marker(base + memory - 4 * MiB, b"livedump marker: 4 MiB below the top of RAM"),
    ]


def no_pause_default(vm: VM, platform: Platform) -> TargetDefault:
    """What --no-pause on the running ``vm`` must write: its target's default,
    where qemu-system-aarch64's is as its CPU model (written out: -cpu cortex-a15
    is an AArch32 model, the others here AArch64 ones)."""
    target = vm.command("query-target")["arch"]
    if target != "aarch64":
        return for_target(target)
    return for_target(target, aarch64_cpu=platform.args != ("-cpu", "cortex-a15"))


def dump(vm: VM, path: Path, *options: str) -> dict:
    """livedump's report of its dump of ``vm`` into ``path``, which must succeed."""
    r = livedump("--pid", str(vm.pid), "--json", *options, str(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", ARCH_PLATFORMS)
def test_vmcore_equals_qemus_on_every_arch(scratch, name):
    platform = ARCH_PLATFORMS[name]
    memory = MEMORY_OF.get(name, MEMORY)
    placed = markers(platform, memory)
    with VM(platform=platform, memory=f"{memory // MiB}M", markers=placed) as vm:
        vm.wait_running(1)
        # Running: paused for the dump, and running again after it.
        running = scratch / "running.vmcore"
        dump(vm, running)
        assert vm.status() == "running"
        assert_markers(running, placed)
        assert identity(running)[:3] == EXPECTED[name]

        # --no-pause: no CPU state from QEMU, so the target's default, said to be one.
        fuzzy = scratch / "fuzzy.vmcore"
        report = dump(vm, fuzzy, "--no-pause")
        assert vm.status() == "running"
        assert_markers(fuzzy, placed)
        default = no_pause_default(vm, platform)
        assert (report["arch"], report["arch_from"]) == (default.arch.name, str(default))
        if not default.assumed:  # The target alone decides: QEMU's identity.
            assert identity(fuzzy)[:3] == EXPECTED[name]
        assert identity(fuzzy)[3] == []  # No CPU notes.

        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        report = dump(vm, ours)
        vm.own_dump(theirs)
        assert identity(theirs)[:3] == EXPECTED[name]
        if name == "ppc64-be":  # ...though the guest asked for little-endian interrupts.
            assert lpcr(vm) & LPCR_ILE
        assert identity(ours) == identity(theirs)  # notes: owners and types, in order
        assert ("CORE", "NT_PRSTATUS") in identity(ours)[3]
        assert first_difference(ours, theirs) is None
        assert_markers(ours, placed)
        assert report["arch"] == name.removesuffix("-elf32").removesuffix("-elf64")
        assert report["arch_from"] == "QEMU's, from the CPU state"
        assert report["elf_class"] == EXPECTED[name][0]


def test_arch_overrides_qemus_judgement(scratch):
    """--arch of QEMU's kind keeps its notes; of another kind it wins, without them."""
    platform = ARCH_PLATFORMS["aarch64-be"]
    placed = markers(platform, 256 * MiB)
    with VM(platform=platform, memory="256M", markers=placed) as vm:
        vm.wait_running(1)
        vm.command("stop")
        theirs = scratch / "qemu.vmcore"
        vm.own_dump(theirs)
        same, other = scratch / "same.vmcore", scratch / "other.vmcore"
        dump(vm, same, "--arch", "aarch64_be")
        assert identity(same) == identity(theirs)
        report = dump(vm, other, "--arch", "arm64")
        assert (report["arch"], report["arch_from"]) == ("aarch64-le", "--arch")
        assert report["cpu_notes"] == "QEMU's CPU notes are for aarch64-be, not --arch aarch64-le"
        assert identity(other) == (64, True, "EM_AARCH64", [])
        assert first_difference(other, theirs) is None  # The memory is the same bytes.
        assert vm.status() == "paused"


# 32-bit Arm, RISC-V and 32-bit PowerPC (integration/firmware_more.py), as
# QEMU 7.2 dumps them.
MORE_EXPECTED = {
    "arm-le": (32, True, "EM_ARM"),
    "arm-be": (32, False, "EM_ARM"),
    "arm-le-on-aarch64": (32, True, "EM_ARM"),
    "arm-be-on-aarch64": (32, False, "EM_ARM"),
    "riscv64": (64, True, "EM_RISCV"),
    "riscv32": (32, True, "EM_RISCV"),
    "ppc-be": (32, False, "EM_PPC"),
    "ppc-le": (32, True, "EM_PPC"),
}
MORE_MEMORY = 256 * MiB


@pytest.mark.parametrize("name", MORE_ARCH_PLATFORMS)
def test_arm_riscv_and_ppc_vmcores_equal_qemus(scratch, name):
    """As test_vmcore_equals_qemus_on_every_arch, for the targets that joined later."""
    platform, expected = MORE_ARCH_PLATFORMS[name], MORE_EXPECTED[name]
    placed = markers(platform, MORE_MEMORY)
    with VM(platform=platform, memory=f"{MORE_MEMORY // MiB}M", markers=placed) as vm:
        vm.wait_running(1)
        running = scratch / "running.vmcore"
        dump(vm, running)
        assert vm.status() == "running"
        assert_markers(running, placed)
        assert identity(running)[:3] == expected

        # --no-pause: the target's default, said to be one where the CPU state
        # would decide; the CPU model says AArch32 on qemu-system-aarch64, so
        # only the byte order is assumed.
        fuzzy = scratch / "fuzzy.vmcore"
        report = dump(vm, fuzzy, "--no-pause")
        assert vm.status() == "running"
        assert_markers(fuzzy, placed)
        # QEMU's class and machine, always: only a byte order is ever assumed.
        assert (identity(fuzzy)[0], identity(fuzzy)[2]) == (expected[0], expected[2])
        default = no_pause_default(vm, platform)
        assert (report["arch"], report["arch_from"]) == (default.arch.name, str(default))
        if not default.assumed or name in ("arm-le", "ppc-be", "arm-le-on-aarch64"):
            assert identity(fuzzy)[:3] == expected
        assert identity(fuzzy)[3] == []

        vm.command("stop")
        ours, theirs = scratch / "ours.vmcore", scratch / "qemu.vmcore"
        report = dump(vm, ours)
        vm.own_dump(theirs)
        assert identity(theirs)[:3] == expected
        assert identity(ours) == identity(theirs)
        assert ("CORE", "NT_PRSTATUS") in identity(ours)[3]
        assert first_difference(ours, theirs) is None
        assert_markers(ours, placed)
        assert report["arch"] == name.removesuffix("-on-aarch64")
        assert report["arch_from"] == "QEMU's, from the CPU state"
        assert report["elf_class"] == expected[0]
        assert vm.status() == "paused"


def test_riscv32_memory_past_elf32_is_refused(scratch):
    """-m 4G puts riscv32 virt's RAM at 2-6 GiB: its size fits no ELF32 field (QEMU's
    own dump writes it cut to 32 bits), and ELF64 EM_RISCV would say riscv64."""
    with VM(platform=MORE_ARCH_PLATFORMS["riscv32"], memory="4G") as vm:
        vm.wait_running(1)
        out = scratch / "vmcore"
        r = livedump("--pid", str(vm.pid), str(out))
        assert r.returncode == 2
        assert r.stderr == (b"livedump: guest memory at 0x80000000-0x17fffffff does not fit an "
                            b"ELF32 riscv32 vmcore, which has no ELF64 form (QEMU's own dump "
                            b"cuts it to 32 bits)\n")
        assert not out.exists() and list(scratch.iterdir()) == []
        assert vm.status() == "running"
