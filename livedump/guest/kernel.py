"""The guest kernel as VMCOREINFO describes it: its symbols, struct layouts, and
the way from its virtual addresses to guest-physical ones.

No vmlinux is needed: VMCOREINFO names the symbols and offsets dump readers
need (makedumpfile and crash read it the same way). On x86_64 a kernel-image
address (above ``__START_KERNEL_map``) is translated by the rule VMCOREINFO
gives (``phys_base``, which KASLR's offset is part of); any other address
(the direct map, vmalloc) by walking the kernel's own top page table,
``init_top_pgt``, which VMCOREINFO also names. On arm64 the linear map and
the image are translated by the numbers VMCOREINFO gives for them
(``aarch64_translate``), with no page table read: the log lives in one or
the other.
"""

from collections.abc import Callable

from livedump.errors import GuestKernelError
from livedump.vmcore.arch import EM_AARCH64, EM_X86_64, Arch
from livedump.vmcore.vmcoreinfo import (
    Invalid,
    aarch64_translate,
    kernel_phys,
    number,
    x86_64_translate,
)

ReadPhys = Callable[[int, int], bytes | None]  # guest-physical address, length

_PAGE = 4096
_START_KERNEL_MAP = 0xFFFFFFFF80000000
# The kernel image's mapping ends where the modules' (vmalloc'ed) begins.
_KERNEL_IMAGE_END = _START_KERNEL_MAP + (1 << 30)
# The targets whose kernel addresses are translated here (the reads are little-endian).
_READ = ("x86_64", "aarch64-le")


class Kernel:
    """The guest kernel of one VMCOREINFO text, read through ``read_phys``."""

    def __init__(self, entries: dict[str, str], arch: Arch, read_phys: ReadPhys) -> None:
        if arch.name not in _READ:
            raise GuestKernelError(f"reading the guest kernel's memory is not supported on "
                                   f"{arch.name} yet (x86_64 and aarch64-le only)")
        self.entries = entries
        self.arch = arch
        self.read_phys = read_phys
        self.release = entries.get("OSRELEASE", "?")
        self._levels = 5 if entries.get("NUMBER(pgtable_l5_enabled)") == "1" else 4
        top = self.symbol("init_top_pgt") if arch.machine == EM_X86_64 else None
        self._root = None if top is None else kernel_phys(entries, arch, top)
        # Pages of the kernel's address space stay where they are mapped: the
        # translations of a log read many times are walked once.
        self._pages: dict[int, int] = {}

    # ---- what VMCOREINFO says -----------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self.entries

    def symbol(self, name: str) -> int | None:
        text = self.entries.get(f"SYMBOL({name})")
        return None if text is None else self._number(text, f"SYMBOL({name})", 16)

    def offset(self, name: str) -> int:
        return self._required(f"OFFSET({name})")

    def size(self, name: str) -> int:
        return self._required(f"SIZE({name})")

    def optional_offset(self, name: str) -> int | None:
        text = self.entries.get(f"OFFSET({name})")
        return None if text is None else self._number(text, f"OFFSET({name})")

    def _required(self, key: str) -> int:
        text = self.entries.get(key)
        if text is None:
            raise GuestKernelError(f"the guest kernel's VMCOREINFO lacks {key}")
        return self._number(text, key)

    @staticmethod
    def _number(text: str, key: str, base: int = 10) -> int:
        try:
            return number(text, key, base)
        except Invalid as e:
            raise GuestKernelError(f"the guest kernel's VMCOREINFO: {e}") from None

    # ---- its memory ----------------------------------------------------------------------

    def phys(self, va: int) -> int | None:
        """The guest-physical address of kernel virtual address ``va``; None if unmapped."""
        page = va & ~(_PAGE - 1)
        base = self._pages.get(page)
        if base is None:
            if self.arch.machine == EM_AARCH64:
                try:
                    base = aarch64_translate(self.entries, page)
                except Invalid as e:
                    raise GuestKernelError(f"the guest kernel's VMCOREINFO: {e}") from None
            elif _START_KERNEL_MAP <= page < _KERNEL_IMAGE_END:
                base = kernel_phys(self.entries, self.arch, page)
            elif self._root is not None:
                base = x86_64_translate(self._root, page, self._levels, self.read_phys)
            if base is None:
                return None
            self._pages[page] = base
        return base + (va - page)

    def read(self, va: int, length: int, what: str) -> bytes:
        """``length`` bytes of the kernel's memory from ``va``, page by page; a
        GuestKernelError naming ``what`` if any of it is unmapped or not RAM."""
        parts, done = [], 0
        while done < length:
            address = va + done
            n = min(length - done, _PAGE - address % _PAGE)
            pa = self.phys(address)
            # Physically contiguous pages are read at once.
            while pa is not None and done + n < length:
                following = self.phys(address + n)
                if following != pa + n:
                    break
                n += min(length - done - n, _PAGE)
            data = None if pa is None else self.read_phys(pa, n)
            if data is None:
                raise GuestKernelError(f"the guest kernel's {what} (virtual {address:#x}) is "
                                       "not mapped to guest RAM")
            parts.append(data)
            done += n
        return b"".join(parts)

    def u64(self, va: int, what: str) -> int:
        return int.from_bytes(self.read(va, 8, what), "little")

    def u32(self, va: int, what: str) -> int:
        return int.from_bytes(self.read(va, 4, what), "little")
