"""Tiny firmware for the 32-bit Arm, RISC-V and 32-bit PowerPC architecture tests.

As in integration/firmware.py: the least code that puts the first CPU in
the state QEMU's ``dump-guest-memory`` reads for the vmcore's class, byte
order and machine (``cpu_get_dump_info`` in ``target/arm/arch_dump.c`` and
``target/riscv/arch_dump.c``, ``target/ppc/arch_dump.c``), then idles.
Assembled with ``binutils-arm-linux-gnueabihf``,
``binutils-riscv64-linux-gnu`` and ``binutils-powerpc64le-linux-gnu``
(installed by ``integration/setup --test``). None of them touches guest RAM
above 64 KiB of its start, where the tests place their markers.
"""

from .firmware import Firmware
from .vm import Platform


def arm(big_endian: bool) -> Firmware:
    """An AArch32 CPU: set SCTLR.EE or not, then wait for interrupts forever.

    QEMU dumps a CPU without AArch64 as ELF32 EM_ARM, big-endian when the
    EL1 SCTLR has EE (bit 25, the byte order of exceptions and table walks)
    set: what a big-endian kernel sets. On ``virt`` without the security
    extensions the CPU starts at the start of flash, where ``-bios`` puts
    this image, and its only SCTLR is the one QEMU reads. Instructions stay
    little-endian (BE8), so the code is the same for both.
    """
    return Firmware(f"arm-{'be' if big_endian else 'le'}", "arm-linux-gnueabihf-", f"""
    .arm
    .globl _start
_start:
    mrc p15, 0, r0, c1, c0, 0
    {'orr r0, r0, #(1 << 25)' if big_endian else ''}
    mcr p15, 0, r0, c1, c0, 0
    isb
1:  wfi
    b 1b
""", link=("-Ttext=0",), assemble=("-march=armv7-a",))


def riscv(bits: int) -> Firmware:
    """A hart that waits for interrupts forever.

    QEMU 7.2 dumps every RISC-V CPU as EM_RISCV of its emulator's word size
    (ELF64 from qemu-system-riscv64, ELF32 from qemu-system-riscv32), and
    little-endian: it would take mstatus.UBE for big-endian, a bit QEMU
    keeps 0. On ``virt`` the reset code jumps to the start of RAM, where
    ``-bios`` puts this image.
    """
    return Firmware(f"riscv{bits}-wfi", "riscv64-linux-gnu-", """
    .globl _start
_start:
1:  wfi
    j 1b
""", link=("-m", f"elf{bits}lriscv", "-Ttext=0x80000000"),
        assemble=(f"-march=rv{bits}i", f"-mabi={'lp64' if bits == 64 else 'ilp32'}"))


def ppc(little_endian: bool) -> Firmware:
    """A 32-bit PowerPC CPU: take interrupts little-endian (MSR.ILE) or not, then spin.

    QEMU dumps a 32-bit PowerPC CPU as ELF32 EM_PPC, little-endian when it
    takes interrupts little-endian, which a 750 (g3beige's CPU) does with
    MSR.ILE. -bios loads this ELF image into g3beige's ROM at its address,
    0xfff00000, and the CPU starts at the reset vector 0x100 above it.
    """
    return Firmware(f"ppc-{'le' if little_endian else 'be'}", "powerpc64le-linux-gnu-", f"""
    .globl _start
_start:
    .org 0x100
    mfmsr 3
    {'oris 3, 3, 1           # MSR.ILE' if little_endian else ''}
    mtmsr 3
    isync
1:  b 1b
""", link=("-m", "elf32ppc", "-Ttext=0xfff00000"), assemble=("-a32", "-mbig"), raw=False)


# One platform for each identity these firmwares give, as integration/vm.py's
# ARCH_PLATFORMS: RAM starts at 1 GiB on Arm's virt, at 2 GiB on RISC-V's,
# at 0 on g3beige.
MORE_ARCH_PLATFORMS = {
    "arm-le": Platform("qemu-system-arm", "virt", (), ("-bios", arm(big_endian=False)),
                       ram_base=0x4000_0000),
    "arm-be": Platform("qemu-system-arm", "virt", (), ("-bios", arm(big_endian=True)),
                       ram_base=0x4000_0000),
    # An AArch32 CPU on the AArch64 emulator: QEMU dumps it as 32-bit Arm.
    "arm-le-on-aarch64": Platform("qemu-system-aarch64", "virt", ("-cpu", "cortex-a15"),
                                  ("-bios", arm(big_endian=False)), ram_base=0x4000_0000),
    "arm-be-on-aarch64": Platform("qemu-system-aarch64", "virt", ("-cpu", "cortex-a15"),
                                  ("-bios", arm(big_endian=True)), ram_base=0x4000_0000),
    "riscv64": Platform("qemu-system-riscv64", "virt", (), ("-bios", riscv(64)),
                        ram_base=0x8000_0000),
    "riscv32": Platform("qemu-system-riscv32", "virt", (), ("-bios", riscv(32)),
                        ram_base=0x8000_0000),
    "ppc-be": Platform("qemu-system-ppc", "g3beige", (), ("-bios", ppc(little_endian=False))),
    "ppc-le": Platform("qemu-system-ppc", "g3beige", (), ("-bios", ppc(little_endian=True))),
}

