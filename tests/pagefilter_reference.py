"""makedumpfile's page test, one struct page after the other: livedump's first
implementation of :func:`livedump.vmcore.pagefilter.classify`, kept as the
oracle its whole-array version is checked against."""

from collections.abc import Container

from livedump.vmcore.pagefilter import (
    CLASSES,
    DL_CACHE,
    DL_CACHE_PRIVATE,
    DL_FREE,
    DL_USER,
    PageLayout,
)


def reference(array: bytes, first: int, count: int, ram: Container[int], max_pfn: int,
              p: PageLayout) -> dict[str, list[int]]:
    """The pfns each class leaves out, among ``count`` from ``first``."""
    out: dict[str, list[int]] = {c: [] for c in CLASSES}
    off, bit, size, level = p.offsets, p.bits, p.size, p.level

    def word(at: int, n: int = 8, signed: bool = False) -> int:
        return int.from_bytes(array[at:at + n], "little", signed=signed)

    def flag(flags: int, name: str) -> bool:
        return bit[name] >= 0 and bool(flags >> bit[name] & 1)

    def is_slab(flags: int, mapcount: int) -> bool:
        return (p.slab_mapcount is not None and mapcount == p.slab_mapcount) or flag(flags, "slab")

    i = 0
    while i < count:
        pfn = first + i
        if pfn not in ram:
            i += 1
            continue
        at = i * size
        flags, mapcount = word(at + off["flags"]), word(at + off["_mapcount"], 4, True)
        mapping, private = word(at + off["mapping"]), word(at + off["private"])
        chead = word(at + off["compound_head"])
        order, dtor = 0, -1
        if flags & p.head_mask and pfn % 512 != 511:
            nxt = at + size
            if p.hugetlb_mapcount is not None or bit["hugetlb"] >= 0:
                flags1 = word(nxt + off["flags"])
                order = flags1 & 0xFF
                if (p.hugetlb_mapcount is not None and mapcount == p.hugetlb_mapcount) or (
                        p.hugetlb_mapcount is None and flags1 >> bit["hugetlb"] & 1):
                    dtor = -2
            else:
                if p.order_offset >= 0:
                    order = array[nxt + p.order_offset]
                if p.dtor_offset >= 0:
                    dtor = array[nxt + p.dtor_offset]
            if order >= 64 or pfn & ((1 << order) - 1):
                order = 0
        is_hugetlb = dtor == -2 or (p.hugetlb_dtor is not None and dtor == p.hugetlb_dtor)
        anon = bool(mapping & 1) and not is_slab(flags, mapcount)
        cache = flag(flags, "lru") or (
            (bit["swapbacked"] < 0 or flag(flags, "swapbacked")) and flag(flags, "swapcache"))
        n = 1 << order
        kind: str | None = None
        if chead & 1:
            kind = None
        elif (level & DL_FREE and p.buddy is not None and not is_slab(flags, mapcount)
              and mapcount == p.buddy):
            if private >= p.max_order:
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
        elif (p.offline_mapcount is not None and not is_slab(flags, mapcount)
              and mapcount == p.offline_mapcount):
            kind = "offline"
        if kind is None:
            i += 1
            continue
        stop = min(pfn + n, max_pfn)
        out[kind].extend(q for q in range(pfn, stop) if q in ram)
        i += stop - pfn
    return {c: pfns for c, pfns in out.items() if pfns}
