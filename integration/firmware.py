"""Tiny firmware for the architecture tests: put the CPU in a known state, then idle.

QEMU's ``dump-guest-memory`` takes a vmcore's class, byte order and
machine from the first CPU's state (``cpu_get_dump_info`` in QEMU's
``target/*/arch_dump.c``), so each identity livedump must match needs a
guest that reaches that state. Each blob here is the least code that does
it, assembled with binutils (``binutils-*-linux-gnu`` for the foreign
targets, installed by ``integration/setup --test``) and cached by content
in ``~/.cache/livedump/firmware``. None of them touches guest RAM above
64 KiB, where the tests place their markers.
"""

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path.home() / ".cache" / "livedump" / "firmware"


@dataclass(frozen=True)
class Firmware:
    """Assembly source and how binutils turn it into what QEMU loads.

    ``link`` are the ``ld`` options that place the code; ``raw`` images
    (for -bios) are the bare bytes, the others ELF files (for -kernel).
    """

    name: str
    binutils: str  # prefix of the binutils commands: "aarch64-linux-gnu-"
    source: str
    link: tuple[str, ...]
    assemble: tuple[str, ...] = ()
    raw: bool = True

    def build(self, cache: Path = CACHE) -> Path:
        """The image, assembled and linked once per distinct recipe."""
        recipe = repr((self.binutils, self.source, self.link, self.assemble, self.raw)).encode()
        out = cache / f"{self.name}-{hashlib.sha256(recipe).hexdigest()[:16]}.img"
        if out.exists():
            return out
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, obj, elf, img = (Path(tmp, n) for n in ("fw.S", "fw.o", "fw.elf", "fw.img"))
            src.write_text(self.source)
            _run([f"{self.binutils}as", *self.assemble, "-o", str(obj), str(src)])
            _run([f"{self.binutils}ld", *self.link, "-o", str(elf), str(obj)])
            if self.raw:
                _run([f"{self.binutils}objcopy", "-O", "binary", str(elf), str(img)])
            else:
                elf.replace(img)
            img.replace(out)  # Atomic: a concurrent run sees a whole file or none.
        return out


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stderr}")


# x86: from the reset vector (real mode, CS based at the ROM) to flat 32-bit
# protected mode, through the firmware's own GDT (gdt_pointer, selectors 0x08
# for code and 0x10 for data); the firmwares below go on from "protected".
_X86_PROTECTED_MODE = r"""
    .code16
    .globl _start
_start:
    cli
    lgdtl %cs:(gdt_pointer - _start)    # real mode: CS is based at the ROM
    movl %cr0, %eax
    orl $1, %eax                        # CR0.PE
    movl %eax, %cr0
    ljmpl $0x08, $protected
    .code32
protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
"""


# x86: from the reset vector to long mode, then halt. QEMU's dump is
# EM_X86_64 only when the first CPU has EFER.LMA set. The ROM is mapped at
# the top of the first 4 GiB (-bios); the CPU starts in real mode at
# 0xfffffff0. The way there: load a GDT, protected mode, identity-map the
# 2 MiB that hold this ROM through page tables at 0x1000-0x3fff, enable PAE
# and EFER.LME, then paging (which sets LMA), and jump to a 64-bit segment.
X86_64_LONG_MODE = Firmware("x86_64-long-mode", "x86_64-linux-gnu-", _X86_PROTECTED_MODE + r"""
    movl $0x1000, %edi                  # clear three page tables
    xorl %eax, %eax
    movl $0xc00, %ecx
    rep stosl
    movl $0x2003, 0x1000                # PML4[0] -> PDPT
    movl $0x3003, 0x2018                # PDPT[3] (3-4 GiB) -> PD
    movl $0xffe00083, 0x3ff8            # PD[511]: this ROM, one 2 MiB page
    movl $0x1000, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                     # CR4.PAE
    movl %eax, %cr4
    movl $0xc0000080, %ecx              # EFER
    rdmsr
    orl $0x100, %eax                    # EFER.LME
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax               # CR0.PG: now EFER.LMA is set
    movl %eax, %cr0
    ljmp $0x18, $long
    .code64
long:
    hlt
    jmp long

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            # 0x08: 32-bit code
    .quad 0x00cf92000000ffff            # 0x10: data
    .quad 0x00af9a000000ffff            # 0x18: 64-bit code
gdt_pointer:
    .word gdt_pointer - gdt - 1
    .long gdt

    .code16
    .org 0xfff0                         # the reset vector, 16 bytes below 4 GiB
    jmp _start
    .org 0x10000
""", link=("-Ttext=0xffff0000",))


def aarch64(big_endian: bool) -> Firmware:
    """Set SCTLR_EL1.EE or not, then wait for interrupts forever.

    QEMU's dump of an AArch64 CPU is big-endian when SCTLR_EL1.EE (bit 25,
    the byte order of EL1 data accesses) is set. On ``virt`` without
    secure or virtualization extensions the CPU starts at EL1, at the
    start of flash, where ``-bios`` puts this image. Instructions are
    always little-endian, so the code is the same for both.
    """
    return Firmware(f"aarch64-{'be' if big_endian else 'le'}", "aarch64-linux-gnu-", f"""
    .globl _start
_start:
    mrs x0, sctlr_el1
    {'orr x0, x0, #(1 << 25)' if big_endian else ''}
    msr sctlr_el1, x0
    isb
1:  wfi
    b 1b
""", link=("-Ttext=0",))


# POWER: QEMU's dump of a POWER9 CPU is little-endian when the CPU takes
# interrupts little-endian, and QEMU 7.2 looks for that in HID0.HILE (IBM
# bit 4), a hypervisor register. powernv starts in hypervisor mode and can
# set it. A pseries guest cannot: it asks for little-endian interrupts with
# the H_SET_MODE hypervisor call, as every little-endian Linux does, which
# sets LPCR.ILE, so QEMU 7.2 dumps a pseries guest big-endian whatever its
# byte order. The CPU starts big-endian at 0x100 (pseries) or 0x10
# (powernv); -bios loads the image at 0.
def _ppc64(name: str, setup: str) -> Firmware:
    return Firmware(name, "powerpc64le-linux-gnu-", f"""
    .globl _start
_start:
    .org 0x10
    b entry
    .org 0x100
entry:{setup}
1:  b 1b
""", link=("-EB", "-Ttext=0"), assemble=("-a64", "-mbig"))


PPC64_HID0_HILE = _ppc64("ppc64-hid0-hile", """
    mfspr 3, 1008           # HID0
    li 4, 1
    sldi 4, 4, 59           # HID0.HILE
    or 3, 3, 4
    mtspr 1008, 3""")

PPC64_H_SET_MODE_LE = _ppc64("ppc64-h-set-mode-le", """
    li 3, 0x31c             # H_SET_MODE
    li 4, 1                 # little-endian
    li 5, 4                 # resource: interrupt byte order
    li 6, 0
    li 7, 0
    sc 1                    # to the hypervisor: QEMU""")


# s390x: a branch to itself. Every s390x vmcore is EM_S390 ELF64
# big-endian; this only has to keep the CPU busy without stopping it (a
# wait PSW on the only CPU ends the VM). -kernel loads an ELF file and
# starts at its entry point when that is not Linux's 0x10000.
S390X_SPIN = Firmware("s390x-spin", "s390x-linux-gnu-", """
    .globl _start
_start:
    j _start
""", link=("-Ttext=0x8000", "-e", "_start"), raw=False)


# x86, for --live: a CPU that stops at once, so guest memory never changes
# and QEMU's own dump of it is the reference whenever it is taken.
X86_HALT = Firmware("x86-halt", "x86_64-linux-gnu-", r"""
    .code16
    .globl _start
_start:
    .org 0xfff0                         # the reset vector
1:  cli
    hlt
    jmp 1b
    .org 0x10000
""", link=("-Ttext=0xffff0000",))

# x86, for --live: a counter stored forever, first at COUNTER_FIRST, then
# at COUNTER_SECOND, 1 MiB apart (in different PT_LOADs). At any instant
# the first equals the second or is one more; memory read while the guest
# runs shows the second ahead. Real mode: the 64 KiB ROM also shows at
# 0xf0000 (so F000:0000 is its start), and A20 is on at reset.
COUNTER_FIRST = 0x0000_1000
COUNTER_SECOND = 0x0010_1000
X86_COUNTER = Firmware("x86-counter", "x86_64-linux-gnu-", rf"""
    .code16
    .globl _start
_start:
    cli
    xorl %eax, %eax
1:  incl %eax
    movw ${COUNTER_FIRST >> 4:#x}, %bx
    movw %bx, %ds
    movl %eax, 0                        # COUNTER_FIRST
    movw $0xffff, %bx
    movw %bx, %ds
    movl %eax, {COUNTER_SECOND - 0xffff0:#x}  # COUNTER_SECOND
    jmp 1b

    .org 0xfff0                         # the reset vector
    ljmp $0xf000, $0                    # to _start, through the ROM below 1 MiB
    .org 0x10000
""", link=("-Ttext=0xffff0000",))

# x86, for --live cut short: a guest that writes its memory all the time, so
# that it keeps reaching pages a background snapshot has not sent yet. In
# 32-bit protected mode with flat segments, it fills SWEEP_START..SWEEP_END
# with ``rep stosl``, SWEEP_STEP bytes at a time, forever, storing the count
# of steps (also the value it fills with, so the pages hold data) at
# SWEEP_COUNTER first. A vCPU left blocked on a write-protected page stops
# the count.
SWEEP_COUNTER = 0x0000_1000
# High in RAM, so that a snapshot (which sends RAM from its start) reaches
# these pages late, whatever the pace of the guest.
SWEEP_START = 0x4000_0000  # 1 GiB
SWEEP_END = 0x5000_0000  # 256 MiB on
SWEEP_STEP = 256 << 10
X86_SWEEPER = Firmware("x86-sweeper", "x86_64-linux-gnu-", _X86_PROTECTED_MODE + rf"""
    cld
    xorl %ebx, %ebx                     # steps done
    movl ${SWEEP_START:#x}, %edi
1:  incl %ebx
    movl %ebx, {SWEEP_COUNTER:#x}
    movl %ebx, %eax
    movl ${SWEEP_STEP // 4:#x}, %ecx
    rep stosl
    cmpl ${SWEEP_END:#x}, %edi
    jb 1b
    movl ${SWEEP_START:#x}, %edi
    jmp 1b

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff            # 0x08: 32-bit code (accessed already:
    .quad 0x00cf93000000ffff            # 0x10: data         no CPU write to ROM)
gdt_pointer:
    .word gdt_pointer - gdt - 1
    .long gdt

    .code16
    .org 0xfff0                         # the reset vector, 16 bytes below 4 GiB
    jmp _start
    .org 0x10000
""", link=("-Ttext=0xffff0000",))
