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
entries; the translation is :func:`livedump.vmcore.vmcoreinfo.x86_64_mapping`.
"""

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # imported where used: a dump with no struct page test never loads it
    import numpy as np

from livedump.vmcore.arch import EM_X86_64, Arch
from livedump.vmcore.vmcoreinfo import ReadPhys, kernel_phys, x86_64_mapping

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
    """The pfns left out (how many by class, and which: one bit each, least
    significant first, as the kdump bitmaps); and, for the report, what could
    not be decided."""

    excluded: dict[str, int] = field(default_factory=dict)  # class -> pages left out
    bits: bytes = b""  # pfns left out (none past its end)
    undecided: str = ""  # why some classes the level names were kept ("" if none)
    # Where the kernel's memory ends (its last section with a struct page array):
    # makedumpfile's files end there, past it lies device memory. None: unknown.
    end_pfn: int | None = None

    def pfns(self) -> list[int]:
        """The pfns left out, in order."""
        import numpy as np

        found = np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), bitorder="little")
        pfns: list[int] = np.flatnonzero(found).tolist()
        return pfns

    def counts(self) -> dict[str, int]:
        return {c: n for c, n in self.excluded.items() if n}


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

    def mapped(self, va: int) -> tuple[int, int]:
        """The physical address of kernel virtual ``va``, and the bytes from it
        on that are physically contiguous (the rest of its page, huge or not)."""
        found = x86_64_mapping(self.root, va, self.levels, self.table_read)
        if found is None:
            raise _Unreadable(f"kernel address {va:#x} is not mapped")
        return found

    def read_virtual(self, va: int, n: int) -> bytes:
        """``n`` bytes at kernel virtual ``va``, a page (huge or not) at a time,
        physical runs read whole."""
        parts: list[bytes] = []
        run_pa, run_len = -1, 0
        at = va
        while at < va + n:
            pa, contiguous = self.mapped(at)
            step = min(contiguous, va + n - at)
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

    def params(self) -> "PageLayout":
        """The layout of ``struct page`` and the numbers the decision tests against."""
        e = self.e

        def optional(key: str) -> int | None:
            return self.num(key) if key in e else None

        return PageLayout(
            size=self.size, level=self.level,
            offsets={k: self.num(f"OFFSET(page.{k})") for k in
                     ("flags", "_mapcount", "mapping", "private", "compound_head")},
            head_mask=self.num("NUMBER(PG_head_mask)"),
            bits={k: self.num(f"NUMBER(PG_{k})", -1) for k in
                  ("lru", "private", "swapcache", "swapbacked", "slab", "hwpoison", "hugetlb")},
            buddy=optional("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"),
            slab_mapcount=optional("NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)"),
            offline_mapcount=optional("NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)"),
            hugetlb_mapcount=optional("NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)"),
            hugetlb_dtor=optional("NUMBER(HUGETLB_PAGE_DTOR)"),
            order_offset=self.num("OFFSET(page.compound_order)", -1),
            dtor_offset=self.num("OFFSET(page.compound_dtor)", -1),
            max_order=self.num("LENGTH(zone.free_area)", 64))

    def decide(self, ram: Ram, max_pfn: int) -> Decision:
        import numpy as np

        params = self.params()
        if params.size % 8 or params.size < 8 or any(
                params.offsets[k] % 8 for k in ("flags", "mapping", "private", "compound_head")
        ) or params.offsets["_mapcount"] % 4:
            raise _Unreadable("struct page has unaligned fields")
        excluded = np.zeros(-(-max_pfn // 8), dtype=np.uint8)
        counts = np.zeros(len(CLASSES), dtype=np.int64)
        spills: list[tuple[int, int, int]] = []
        end = 0
        for first, mem_map in self.mem_maps(max_pfn):
            count = min(self.section_pages, max_pfn - first)
            end = first + count
            in_ram = None if ram.all_set(first, count) else _ram_mask(ram, first, count)
            kinds, spilled = classify(self.read_virtual(mem_map, count * params.size), first,
                                      count, in_ram, max_pfn, params)
            spills += spilled
            kept = kinds >= 0
            counts += np.bincount(kinds[kept], minlength=len(CLASSES))
            # A section's first pfn is a multiple of 8: whole bytes of the bitmap.
            packed = np.packbits(kept, bitorder="little")
            excluded[first // 8:first // 8 + len(packed)] |= packed
        for start, stop, kind in spills:  # blocks that ran past their section
            for pfn in range(start, stop):
                if pfn in ram and not excluded[pfn >> 3] >> (pfn & 7) & 1:
                    excluded[pfn >> 3] |= 1 << (pfn & 7)
                    counts[kind] += 1
        return Decision({c: int(n) for c, n in zip(CLASSES, counts, strict=True) if n},
                        excluded.tobytes(), end_pfn=end or None)


@dataclass(frozen=True)
class PageLayout:
    """What the decision reads in a ``struct page`` (byte offsets, ``PG_*`` bit
    numbers, -1 where VMCOREINFO has none) and tests against (None where absent)."""

    size: int
    level: int
    offsets: dict[str, int]
    head_mask: int
    bits: dict[str, int]
    buddy: int | None
    slab_mapcount: int | None
    offline_mapcount: int | None
    hugetlb_mapcount: int | None
    hugetlb_dtor: int | None
    order_offset: int
    dtor_offset: int
    max_order: int


_NONE = -1  # a pfn kept (the kinds are indices into CLASSES)
_FREE, _CACHE, _CACHE_PRIVATE, _USER, _HWPOISON, _OFFLINE = range(len(CLASSES))


def _ram_mask(ram: Ram, first: int, count: int) -> "np.ndarray[Any, np.dtype[np.bool_]]":
    import numpy as np

    return np.fromiter((first + i in ram for i in range(count)), dtype=np.bool_, count=count)


def classify(array: bytes, first: int, count: int,
             in_ram: "np.ndarray[Any, np.dtype[np.bool_]] | None", max_pfn: int,
             p: PageLayout) -> tuple["np.ndarray[Any, np.dtype[np.int8]]",
                                     list[tuple[int, int, int]]]:
    """The class (an index into CLASSES, or -1: kept) of each of the ``count``
    pfns from ``first`` whose ``struct page`` array is ``array``; ``in_ram``
    says which are RAM (None: all). makedumpfile's test, page by page in its
    order, made on whole arrays at once: a compound page's head or a free
    block's first page decides for all of its pages (those pages are not
    tested themselves). Also (first pfn, end, class) of each block that runs
    past the array (its pages there not yet told apart from non-RAM).
    """
    import numpy as np

    u8 = np.frombuffer(array, dtype=np.uint8, count=count * p.size)
    step = p.size // 8
    words = u8.view("<u8")
    flags = words[p.offsets["flags"] // 8::step]
    mapping = words[p.offsets["mapping"] // 8::step]
    private = words[p.offsets["private"] // 8::step]
    chead = words[p.offsets["compound_head"] // 8::step]
    mapcount = u8.view("<i4")[p.offsets["_mapcount"] // 4::p.size // 4]
    pfn = np.arange(first, first + count, dtype=np.uint64)
    none = np.zeros(count, dtype=np.bool_)

    def flag(name: str, of: "np.ndarray[Any, np.dtype[np.uint64]]" = flags
             ) -> "np.ndarray[Any, np.dtype[np.bool_]]":
        bit = p.bits[name]
        return none if bit < 0 else (of >> np.uint64(bit)) & np.uint64(1) != 0

    def mapcount_is(value: int | None) -> "np.ndarray[Any, np.dtype[np.bool_]]":
        return none if value is None else mapcount == value

    def after(field: "np.ndarray[Any, Any]") -> "np.ndarray[Any, Any]":
        """The field of the next struct page (zero past the array's end)."""
        nxt = np.zeros_like(field)
        nxt[:-1] = field[1:]
        return nxt

    # A compound head's order and destructor are in its next struct page; a
    # section is 512-aligned, and makedumpfile looks no further at 511 either.
    head = (flags & np.uint64(p.head_mask) != 0) & (pfn % 512 != 511)
    dtor = np.full(count, -1, dtype=np.int64)
    hugetlb = none
    if p.hugetlb_mapcount is not None or p.bits["hugetlb"] >= 0:
        flags1 = after(flags)
        order = np.where(head, flags1 & np.uint64(0xFF), 0).astype(np.uint64)
        hugetlb = head & (mapcount_is(p.hugetlb_mapcount) if p.hugetlb_mapcount is not None
                          else flag("hugetlb", flags1))
    else:
        order = np.zeros(count, dtype=np.uint64)
        if p.order_offset >= 0:
            order = np.where(head, after(u8[p.order_offset::p.size]), 0).astype(np.uint64)
        if p.dtor_offset >= 0:
            dtor = np.where(head, after(u8[p.dtor_offset::p.size]), -1).astype(np.int64)
    misaligned = pfn & ((np.uint64(1) << np.minimum(order, np.uint64(63))) - np.uint64(1)) != 0
    order[(order >= 64) | misaligned] = 0
    if p.hugetlb_dtor is not None:
        hugetlb = hugetlb | (dtor == p.hugetlb_dtor)
    slab = mapcount_is(p.slab_mapcount) | flag("slab")
    anon = (mapping & np.uint64(1) != 0) & ~slab
    swapbacked = ~none if p.bits["swapbacked"] < 0 else flag("swapbacked")
    cache = flag("lru") | (swapbacked & flag("swapcache"))
    private_flag = flag("private")
    buddy = (mapcount_is(p.buddy) & ~slab) if p.level & DL_FREE else none
    tail = chead & np.uint64(1) != 0
    level = p.level
    kinds = np.select(
        [tail, buddy & (private >= p.max_order), buddy,
         cache & ~private_flag & ~anon if level & DL_CACHE else none,
         cache & ~anon if level & DL_CACHE_PRIVATE else none,
         anon | hugetlb if level & DL_USER else none,
         flag("hwpoison"),
         mapcount_is(p.offline_mapcount) & ~slab],
        [_NONE, _NONE, _FREE, _CACHE, np.where(private_flag, _CACHE_PRIVATE, _CACHE), _USER,
         _HWPOISON, _OFFLINE], _NONE).astype(np.int8)
    if in_ram is not None:
        kinds[~in_ram] = _NONE
    # Blocks of more than one page, in pfn order: each leaves out its pages,
    # and a block among the pages of one before it is not a block at all.
    log_n = np.where(kinds == _FREE, private, order)
    out = np.where(log_n == 0, kinds, _NONE).astype(np.int8)
    spills: list[tuple[int, int, int]] = []
    covered = 0
    for i in np.flatnonzero((kinds != _NONE) & (log_n != 0)).tolist():
        if i < covered:
            continue
        kind, start = int(kinds[i]), first + i
        stop = min(start + (1 << int(log_n[i])), max_pfn)
        inside = min(stop - first, count)
        out[i:inside] = kind if in_ram is None else np.where(in_ram[i:inside], kind, _NONE)
        if stop > first + count:
            spills.append((first + count, stop, kind))
        covered = i + stop - start
    return out, spills
