"""arm64 kernel addresses to physical ones by VMCOREINFO's numbers alone
(asm/memory.h's rule): the linear map and the image, on the layouts Linux
has had (the linear map below the image since 5.4, above it before; 48- and
52-bit kernel VA spaces), and the kernel reader on top of it."""

import pytest

from livedump.errors import GuestKernelError
from livedump.guest.kernel import Kernel
from livedump.vmcore.arch import lookup
from livedump.vmcore.vmcoreinfo import Invalid, aarch64_translate

AARCH64 = lookup("aarch64-le")

# Debian's 6.1.0-57-arm64 under qemu-system-aarch64 -M virt (512 MiB at 1 GiB),
# KASLR on, log_buf_len=4M: as livedump found them in the running guest. The
# linear map's randomization made PHYS_OFFSET negative (printed as 64 bits).
DEBIAN_6_1 = {
    "OSRELEASE": "6.1.0-57-arm64", "PAGESIZE": "4096", "NUMBER(VA_BITS)": "48",
    "NUMBER(kimage_voffset)": "0xffffb8208b400000",
    "NUMBER(PHYS_OFFSET)": "0xffffc970c0000000", "KERNELOFFSET": "3820c3600000",
    "NUMBER(TCR_EL1_T1SZ)": "0x10", "SYMBOL(init_uts_ns)": "ffffb820cd51c030",
    "SYMBOL(prb)": "ffffb820cd2e8750",
}


def test_a_real_48_bit_kernels_image_and_linear_map():
    # prb (image) held 0xffffb820cd582780 (image: printk_rb_dynamic), whose
    # descriptor ring was at 0xffff368f9af00000 (linear map, memblock'd by log_buf_len=).
    assert aarch64_translate(DEBIAN_6_1, 0xFFFFB820CD2E8750) == 0x41EE8750
    assert aarch64_translate(DEBIAN_6_1, 0xFFFFB820CD582780) == 0x42182780
    assert aarch64_translate(DEBIAN_6_1, 0xFFFF368F9AF00000) == 0x5AF00000
    # The linear map's first and last addresses (PAGE_OFFSET maps PHYS_OFFSET,
    # which no RAM is at here), and the image's side of its end.
    assert aarch64_translate(DEBIAN_6_1, 0xFFFF000000000000) == 0xFFFFC970C0000000
    assert aarch64_translate(DEBIAN_6_1, 0xFFFF7FFFFFFFFFFF) == (
        0x7FFFFFFFFFFF + 0xFFFFC970C0000000) % (1 << 64)
    assert aarch64_translate(DEBIAN_6_1, 0xFFFF800000000000) == (
        0xFFFF800000000000 - 0xFFFFB8208B400000) % (1 << 64)


def vmcoreinfo(va_bits: int, page: int = 4096, t1sz: int | None = None,
               image: int = 0xFFFF800008000000, phys_offset: int = 0x40000000,
               kimage_voffset: int = 0xFFFF7FFFC8000000) -> dict[str, str]:
    entries = {"PAGESIZE": str(page), "NUMBER(VA_BITS)": str(va_bits),
               "NUMBER(PHYS_OFFSET)": f"{phys_offset % (1 << 64):#x}",
               "NUMBER(kimage_voffset)": f"{kimage_voffset:#x}",
               "SYMBOL(init_uts_ns)": f"{image:x}"}
    if t1sz is not None:
        entries["NUMBER(TCR_EL1_T1SZ)"] = f"{t1sz:#x}"
    return entries


def test_52_bit_va_on_52_bit_hardware():
    # PAGE_OFFSET is -(1 << 52); the linear map ends at -(1 << 47), where modules
    # and the image begin.
    entries = vmcoreinfo(52, t1sz=12)
    assert aarch64_translate(entries, 0xFFF0000000000000) == 0x40000000
    assert aarch64_translate(entries, 0xFFF0000012345678) == 0x52345678
    assert aarch64_translate(entries, 0xFFFF7FFFFFFFF000) == 0xF7FFFFFFFF000 + 0x40000000
    assert aarch64_translate(entries, 0xFFFF800008010000) == 0x40010000


def test_52_bit_va_on_48_bit_hardware():
    # The kernel keeps PAGE_OFFSET at -(1 << 52) but maps RAM from -(1 << 48): it
    # lowers PHYS_OFFSET by the difference (negative), and the one rule still holds.
    phys_offset = 0x40000000 - ((1 << 52) - (1 << 48))
    entries = vmcoreinfo(52, t1sz=16, phys_offset=phys_offset) | {"OSRELEASE": "6.8.0"}
    assert aarch64_translate(entries, 0xFFFF000000000000) == 0x40000000
    assert aarch64_translate(entries, 0xFFFF000012345678) == 0x52345678
    assert aarch64_translate(entries, 0xFFFF800008010000) == 0x40010000


@pytest.mark.parametrize("release", ["5.10.0-28-arm64", "5.9.1"])
def test_52_bit_va_on_48_bit_hardware_before_5_11(release):
    # 5.4 to 5.10 left PHYS_OFFSET as it was and counted from -(1 << 48) instead.
    entries = vmcoreinfo(52, t1sz=16) | {"OSRELEASE": release}
    assert aarch64_translate(entries, 0xFFFF000000000000) == 0x40000000
    assert aarch64_translate(entries, 0xFFFF000012345678) == 0x52345678
    assert aarch64_translate(entries, 0xFFFF800008010000) == 0x40010000
    # On 52-bit hardware T1SZ says 52 bits: the one rule.
    entries = vmcoreinfo(52, t1sz=12) | {"OSRELEASE": release}
    assert aarch64_translate(entries, 0xFFF0000012345678) == 0x52345678


def test_52_bit_va_with_16k_pages_ends_the_linear_map_at_47_bits():
    entries = vmcoreinfo(52, page=16384, image=0xFFFFC00008000000)
    assert aarch64_translate(entries, 0xFFFF800000000000) == 0xF800000000000 + 0x40000000
    # From -(1 << 46) on, not the linear map: the image's rule.
    assert aarch64_translate(entries, 0xFFFFC00008010000) == (
        0xFFFFC00008010000 - 0xFFFF7FFFC8000000)


def test_39_bit_va():
    entries = vmcoreinfo(39, image=0xFFFFFFC008000000, kimage_voffset=0xFFFFFFBFC8000000)
    assert aarch64_translate(entries, 0xFFFFFF8000001000) == 0x40001000
    assert aarch64_translate(entries, 0xFFFFFFC008001000) == 0x40001000


def test_before_5_4_the_linear_map_is_the_upper_half():
    # Before the flip: PAGE_OFFSET -(1 << (VA_BITS - 1)), the image below it.
    entries = vmcoreinfo(48, image=0xFFFF000008F00000, kimage_voffset=0xFFFEFFFFC8000000)
    assert aarch64_translate(entries, 0xFFFF800000000000) == 0x40000000
    assert aarch64_translate(entries, 0xFFFF800000ABC000) == 0x40ABC000
    assert aarch64_translate(entries, 0xFFFF000008F00000) == 0x40F00000


@pytest.mark.parametrize("missing", ["NUMBER(VA_BITS)", "NUMBER(PHYS_OFFSET)"])
def test_a_vmcoreinfo_without_the_numbers_is_invalid(missing):
    entries = vmcoreinfo(48)
    del entries[missing]
    with pytest.raises(Invalid, match=missing.replace("(", r"\(").replace(")", r"\)")):
        aarch64_translate(entries, 0xFFFF000000001000)


def test_a_va_size_arm64_has_not_is_invalid():
    with pytest.raises(Invalid, match=r"VA_BITS\)=64 is not an arm64 VA size"):
        aarch64_translate(vmcoreinfo(64), 0xFFFF000000001000)


def test_the_kernel_reads_arm64_memory_through_both_maps():
    memory = {0x41EE8000: bytes(range(256)) * 16, 0x5AF00000: b"\x5a" * 4096}

    def read(gpa: int, n: int) -> bytes | None:
        page = memory.get(gpa & ~4095)
        return None if page is None else page[gpa & 4095 : (gpa & 4095) + n]

    kernel = Kernel(DEBIAN_6_1, AARCH64, read)
    assert kernel.read(0xFFFFB820CD2E8750, 4, "prb") == bytes([0x50, 0x51, 0x52, 0x53])
    assert kernel.read(0xFFFF368F9AF00010, 2, "descs") == b"\x5a\x5a"
    with pytest.raises(GuestKernelError, match="not mapped to guest RAM"):
        kernel.read(0xFFFF368F9AF01000, 8, "descs")
    lacking = {k: v for k, v in DEBIAN_6_1.items() if k != "NUMBER(PHYS_OFFSET)"}
    with pytest.raises(GuestKernelError, match="VMCOREINFO: lacks NUMBER"):
        Kernel(lacking, AARCH64, read).read(0xFFFF368F9AF00010, 2, "descs")
