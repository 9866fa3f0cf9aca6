"""Which pages a dump level leaves out, from the guest kernel's own ``struct page`` array.

This is makedumpfile's decision (its ``__exclude_unnecessary_pages``), made
on guest memory as read from QEMU: VMCOREINFO locates ``mem_section`` and
gives the layout of ``struct page`` and the ``PG_*`` and
``PAGE_*_MAPCOUNT_VALUE`` numbers; the kernel's virtual addresses (the
section roots, the ``vmemmap``) are turned into physical ones by walking the
kernel's own page tables from ``init_top_pgt`` (x86_64). Pages are sorted,
in makedumpfile's order of tests, into:

* ``free``: a free buddy block (level 16), left out whole, by its order;
* ``cache`` / ``cache_private``: page cache without / with private data
  (levels 2 and 4);
* ``user``: anonymous and hugetlbfs pages (level 8);
* ``hwpoison`` and ``offline``: never worth reading, left out whenever the
  array is read at all, as makedumpfile does.

A compound page's head decides for the whole compound page. Whatever cannot
be decided (VMCOREINFO lacks a number, a table is outside RAM) is kept: a
dump never loses a page the level does not name.

Its interface is narrow on purpose: ``read(gpa, n)`` and VMCOREINFO's
entries; the translation is :func:`livedump.vmcore.vmcoreinfo.x86_64_translate`.
"""

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from livedump.vmcore.arch import EM_X86_64, Arch
from livedump.vmcore.vmcoreinfo import ReadPhys, kernel_phys, x86_64_translate

DL_CACHE, DL_CACHE_PRIVATE, DL_USER, DL_FREE = 2, 4, 8, 16
STRUCT_PAGE_LEVELS = DL_CACHE | DL_CACHE_PRIVATE | DL_USER | DL_FREE
CLASSES = ("free", "cache", "cache_private", "user", "hwpoison", "offline")

_SECTION_HAS_MEM_MAP = 1 << 1
_SECTION_MAP_MASK = ~((1 << 5) - 1) & (1 << 64) - 1  # Linux 4.13 and later
_PAGE_MAPPING_ANON = 1
_MASK64 = (1 << 64) - 1
_TABLE = 4096
# What the decision needs from VMCOREINFO, whatever the level.
_NEEDED = ("SYMBOL(mem_section)", "SIZE(mem_section)", "OFFSET(mem_section.section_mem_map)",
           "NUMBER(SECTION_SIZE_BITS)", "SIZE(page)", "OFFSET(page.flags)",
           "OFFSET(page._mapcount)", "OFFSET(page.mapping)", "OFFSET(page.private)",
           "OFFSET(page.compound_head)", "NUMBER(PG_head_mask)", "SYMBOL(init_top_pgt)",
           "NUMBER(PG_slab)")
_BY_LEVEL = {DL_FREE: ("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)",),
             DL_CACHE: ("NUMBER(PG_lru)", "NUMBER(PG_private)", "NUMBER(PG_swapcache)"),
             DL_CACHE_PRIVATE: ("NUMBER(PG_lru)", "NUMBER(PG_swapcache)"),
             DL_USER: ()}


@dataclass
class Decision:
    """The pfns left out, by class; and, for the report, what could not be decided."""

    excluded: dict[str, list[int]] = field(default_factory=dict)
    undecided: str = ""  # why some classes the level names were kept ("" if none)
    # Where the kernel's memory ends (its last section with a struct page array):
    # makedumpfile's files end there, past it lies device memory. None: unknown.
    end_pfn: int | None = None

    def pfns(self) -> Iterable[int]:
        for pfns in self.excluded.values():
            yield from pfns

    def counts(self) -> dict[str, int]:
        return {c: len(p) for c, p in self.excluded.items() if p}


class Ram(Protocol):
    """Which pfns are RAM (a bitmap)."""

    def __contains__(self, pfn: int) -> bool: ...
    def all_set(self, first: int, count: int) -> bool: ...


def decide(entries: dict[str, str] | None, arch: Arch, read: ReadPhys, ram: Ram,
           max_pfn: int, dump_level: int) -> Decision:
    """The pages ``dump_level`` leaves out among pfns ``< max_pfn`` that ``ram``
    says are RAM; never raises for what guest memory holds."""
    if entries is None:
        return Decision(undecided="no VMCOREINFO, so no struct page array to read"
                        if dump_level & STRUCT_PAGE_LEVELS else "")
    if not dump_level & STRUCT_PAGE_LEVELS:
        try:
            return Decision(end_pfn=_Reader(entries, arch, read, 0).end_pfn(max_pfn))
        except (_Unreadable, KeyError, ValueError):
            return Decision()
    if arch.machine != EM_X86_64:
        return Decision(undecided=f"livedump reads the struct page array of x86_64 "
                        f"kernels only, not {arch.name}'s")
    missing = [k for k in _NEEDED if k not in entries]
    missing += [k for bit, keys in _BY_LEVEL.items() if dump_level & bit for k in keys
                if k not in entries and k not in missing]
    if missing:
        return Decision(undecided=f"VMCOREINFO lacks {', '.join(missing)}")
    try:
        return _Reader(entries, arch, read, dump_level).decide(ram, max_pfn)
    except (_Unreadable, KeyError, ValueError) as e:
        return Decision(undecided=f"the struct page array could not be read: {e}")


class _Unreadable(Exception):
    pass


class _Reader:
    def __init__(self, entries: dict[str, str], arch: Arch, read: ReadPhys,
                 dump_level: int) -> None:
        self.e, self.level = entries, dump_level
        self._read = read
        self._tables: dict[int, bytes | None] = {}
        top = kernel_phys(entries, arch, self.hex("SYMBOL(init_top_pgt)"))
        if top is None:
            raise _Unreadable("init_top_pgt has no physical address")
        self.root = top
        self.levels = 5 if entries.get("NUMBER(pgtable_l5_enabled)") == "1" else 4
        self.page_size = self.num("PAGESIZE")
        self.size = self.num("SIZE(page)")
        self.section_pages = 1 << (self.num("NUMBER(SECTION_SIZE_BITS)")
                                   - (self.page_size.bit_length() - 1))
        self.per_root = self.page_size // self.num("SIZE(mem_section)")

    def num(self, key: str, default: int | None = None) -> int:
        text = self.e.get(key)
        if text is None:
            if default is None:
                raise _Unreadable(f"VMCOREINFO lacks {key}")
            return default
        return int(text, 0)

    def hex(self, key: str) -> int:
        return int(self.e[key], 16)

    def table_read(self, gpa: int, n: int) -> bytes | None:
        """Reads of page-table entries, a table page read once."""
        base = gpa - gpa % _TABLE
        if base not in self._tables:
            self._tables[base] = self._read(base, _TABLE)
        page = self._tables[base]
        return None if page is None else page[gpa - base:gpa - base + n]

    def phys(self, va: int) -> int:
        pa = x86_64_translate(self.root, va, self.levels, self.table_read)
        if pa is None:
            raise _Unreadable(f"kernel address {va:#x} is not mapped")
        return pa

    def read_virtual(self, va: int, n: int) -> bytes:
        """``n`` bytes at kernel virtual ``va``, page by page, physical runs read whole."""
        parts: list[bytes] = []
        run_pa, run_len = -1, 0
        at = va
        while at < va + n:
            step = min(self.page_size - at % self.page_size, va + n - at)
            pa = self.phys(at)
            if run_len and pa == run_pa + run_len:
                run_len += step
            else:
                if run_len:
                    parts.append(self._must(run_pa, run_len))
                run_pa, run_len = pa, step
            at += step
        if run_len:
            parts.append(self._must(run_pa, run_len))
        return b"".join(parts)

    def _must(self, gpa: int, n: int) -> bytes:
        data = self._read(gpa, n)
        if data is None:
            raise _Unreadable(f"guest-physical {gpa:#x}+{n:#x} is not RAM")
        return data

    def mem_maps(self, max_pfn: int) -> Iterable[tuple[int, int]]:
        """(first pfn, address of its struct page) of each section with a mem_map."""
        sections = -(-max_pfn // self.section_pages)
        roots_va = self.hex("SYMBOL(mem_section)")
        roots = -(-sections // self.per_root)
        extreme = "LENGTH(mem_section)" in self.e and self.per_root > 1
        root_ptrs = (struct.unpack(f"<{roots}Q", self.read_virtual(roots_va, 8 * roots))
                     if extreme else None)
        ms_size = self.num("SIZE(mem_section)")
        map_off = self.num("OFFSET(mem_section.section_mem_map)")
        for nr in range(sections):
            if root_ptrs is not None:
                base = root_ptrs[nr // self.per_root]
                if not base:
                    continue
                va = base + nr % self.per_root * ms_size
            else:
                va = roots_va + nr * ms_size
            coded = int.from_bytes(self.read_virtual(va + map_off, 8), "little")
            if not coded & _SECTION_HAS_MEM_MAP:
                continue
            first = nr * self.section_pages
            yield first, ((coded & _SECTION_MAP_MASK) + first * self.size) & _MASK64

    def end_pfn(self, max_pfn: int) -> int | None:
        ends = [first + self.section_pages for first, _ in self.mem_maps(max_pfn)]
        return min(max(ends), max_pfn) if ends else None

    def decide(self, ram: Ram, max_pfn: int) -> Decision:
        out: dict[str, list[int]] = {c: [] for c in CLASSES}
        e = self.e
        off = {k: self.num(f"OFFSET(page.{k})") for k in
               ("flags", "_mapcount", "mapping", "private", "compound_head")}
        head_mask = self.num("NUMBER(PG_head_mask)")
        bit = {k: self.num(f"NUMBER(PG_{k})", -1) for k in
               ("lru", "private", "swapcache", "swapbacked", "slab", "hwpoison", "hugetlb")}
        buddy = self.num("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", 0) if \
            "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)" in e else None
        slab_mc = (self.num("NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)")
                   if "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)" in e else None)
        offline_mc = (self.num("NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)")
                      if "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)" in e else None)
        hugetlb_mc = (self.num("NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)")
                      if "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)" in e else None)
        hugetlb_dtor = (self.num("NUMBER(HUGETLB_PAGE_DTOR)")
                        if "NUMBER(HUGETLB_PAGE_DTOR)" in e else None)
        order_off = self.num("OFFSET(page.compound_order)", -1)
        dtor_off = self.num("OFFSET(page.compound_dtor)", -1)
        max_order = self.num("LENGTH(zone.free_area)", 64)
        level, size = self.level, self.size
        if size % 8 or any(off[k] % 8 for k in ("flags", "mapping", "private", "compound_head")) \
                or off["_mapcount"] % 4:
            raise _Unreadable("struct page has unaligned fields")

        def flag(flags: int, name: str) -> bool:
            return bit[name] >= 0 and bool(flags >> bit[name] & 1)

        def is_slab(flags: int, mapcount: int) -> bool:
            return (slab_mc is not None and mapcount == slab_mc) or flag(flags, "slab")

        end = 0
        for first, mem_map in self.mem_maps(max_pfn):
            count = min(self.section_pages, max_pfn - first)
            end = first + count
            array = self.read_virtual(mem_map, count * size)
            # Each field of every struct page, as one list: strided views of the array.
            words, ints = memoryview(array).cast("Q"), memoryview(array).cast("i")
            field_flags = words[off["flags"] // 8::size // 8].tolist()
            field_mapping = words[off["mapping"] // 8::size // 8].tolist()
            field_private = words[off["private"] // 8::size // 8].tolist()
            field_head = words[off["compound_head"] // 8::size // 8].tolist()
            field_mapcount = ints[off["_mapcount"] // 4::size // 4].tolist()
            all_ram = ram.all_set(first, count)
            i = 0
            while i < count:
                pfn = first + i
                if not all_ram and pfn not in ram:
                    i += 1
                    continue
                at = i * size
                flags, mapcount = field_flags[i], field_mapcount[i]
                mapping, private, chead = field_mapping[i], field_private[i], field_head[i]
                order, dtor = 0, -1
                # The next struct page is in the array: a section is 512-aligned,
                # and makedumpfile looks no further at 511 either.
                if flags & head_mask and pfn % 512 != 511:
                    nxt = at + size
                    if hugetlb_mc is not None or bit["hugetlb"] >= 0:
                        flags1 = int.from_bytes(array[nxt + off["flags"]:nxt + off["flags"] + 8],
                                                "little")
                        order = flags1 & 0xFF
                        if (hugetlb_mc is not None and mapcount == hugetlb_mc) or (
                                hugetlb_mc is None and flags1 >> bit["hugetlb"] & 1):
                            dtor = -2  # hugetlb
                    else:
                        if order_off >= 0:
                            order = array[nxt + order_off]
                        if dtor_off >= 0:
                            dtor = array[nxt + dtor_off]
                    if order >= 64 or pfn & ((1 << order) - 1):
                        order = 0
                is_hugetlb = dtor == -2 or (hugetlb_dtor is not None and dtor == hugetlb_dtor)
                anon = bool(mapping & _PAGE_MAPPING_ANON) and not is_slab(flags, mapcount)
                cache = flag(flags, "lru") or (
                    (bit["swapbacked"] < 0 or flag(flags, "swapbacked"))
                    and flag(flags, "swapcache"))
                n = 1 << order
                kind: str | None = None
                if chead & 1:
                    kind = None  # a tail: its head decided
                elif (level & DL_FREE and buddy is not None and not is_slab(flags, mapcount)
                      and mapcount == buddy):
                    if private >= max_order:
                        kind = None
                    else:
                        kind, n = "free", 1 << private
                elif level & DL_CACHE and cache and not flag(flags, "private") and not anon:
                    kind = "cache"
                elif level & DL_CACHE_PRIVATE and cache and not anon:
                    kind = "cache_private" if flag(flags, "private") else "cache"
                elif level & DL_USER and (anon or is_hugetlb):
                    kind = "user"
                elif flag(flags, "hwpoison"):
                    kind = "hwpoison"
                elif (offline_mc is not None and not is_slab(flags, mapcount)
                      and mapcount == offline_mc):
                    kind = "offline"
                if kind is None:
                    i += 1
                    continue
                if n == 1:
                    out[kind].append(pfn)
                    i += 1
                    continue
                stop = min(pfn + n, max_pfn)
                out[kind].extend(range(pfn, stop) if all_ram and stop <= end
                                 else (p for p in range(pfn, stop) if p in ram))
                i += stop - pfn
        return Decision({c: p for c, p in out.items() if p}, end_pfn=end or None)
