"""The struct page decision made on whole arrays against the page-by-page oracle
(tests/pagefilter_reference.py), on arrays of made-up struct pages that hit
every branch: compound heads and tails, free blocks, hugetlb, slab look-alikes,
holes in RAM, blocks running past the array."""

import random
import struct
from dataclasses import replace

import numpy as np
import pytest

from livedump.vmcore.kdump import Bitmap
from livedump.vmcore.pagefilter import CLASSES, Decision, PageLayout, classify
from tests.pagefilter_reference import reference

SIZE = 64
BUDDY, SLAB, OFFLINE, HUGETLB = -129, -513, -257, -1025
BITS = {"lru": 4, "private": 13, "swapcache": 10, "swapbacked": 19, "slab": 9, "hwpoison": 23,
        "hugetlb": -1}
HEAD = 1 << 16
NEW = PageLayout(  # hugetlb told by _mapcount, as Linux 6.x
    size=SIZE, level=31,
    offsets={"flags": 0, "compound_head": 8, "mapping": 24, "private": 40, "_mapcount": 48},
    head_mask=HEAD, bits=BITS, buddy=BUDDY, slab_mapcount=SLAB, offline_mapcount=OFFLINE,
    hugetlb_mapcount=HUGETLB, hugetlb_dtor=None, order_offset=-1, dtor_offset=-1, max_order=11)
FLAG_BIT = replace(NEW, hugetlb_mapcount=None, slab_mapcount=None,
                   bits={**BITS, "hugetlb": 24})  # PG_hugetlb
OLD = replace(NEW, hugetlb_mapcount=None, slab_mapcount=None, offline_mapcount=None,
              hugetlb_dtor=2, order_offset=17, dtor_offset=16,  # compound_order, _dtor
              bits={**BITS, "swapbacked": -1})


def struct_pages(rng: random.Random, count: int) -> bytes:
    """``count`` made-up struct pages, dense with everything the test looks at."""
    out = bytearray(count * SIZE)
    for i in range(count):
        flags = sum(1 << b for b in BITS.values() if b >= 0 and rng.random() < 0.2)
        flags |= (1 << 24) * (rng.random() < 0.1)
        if rng.random() < 0.15:
            flags |= HEAD
        if i and out[(i - 1) * SIZE + 2] & 1:  # the page after a head: the order
            flags = flags & ~0xFF | rng.choice([0, 1, 2, 3, 9, 10, 70])
        mapcount = rng.choice([-1, -1, -1, 0, 3, BUDDY, BUDDY, SLAB, OFFLINE, HUGETLB])
        mapping = rng.getrandbits(64) & ~1 | (rng.random() < 0.3)
        private = rng.choice([0, 0, 1, 2, 3, 9, 10, 11, 12, rng.getrandbits(64)])
        chead = (rng.getrandbits(64) | 1) if rng.random() < 0.1 else 0
        struct.pack_into("<QQ8xQ8xQi", out, i * SIZE, flags, chead, mapping, private, mapcount)
        out[i * SIZE + 16] = rng.choice([0, 2, 5])  # the next page's compound_dtor, in OLD
        out[i * SIZE + 17] = rng.choice([0, 1, 3, 9, 64])  # compound_order
    return bytes(out)


def ours(array: bytes, first: int, count: int, ram: set[int] | None, max_pfn: int,
         p: PageLayout) -> dict[str, list[int]]:
    in_ram = None if ram is None else np.array([first + i in ram for i in range(count)])
    kinds, spills = classify(array, first, count, in_ram, max_pfn, p)
    out: dict[str, list[int]] = {}
    for i in np.flatnonzero(kinds >= 0).tolist():
        out.setdefault(CLASSES[kinds[i]], []).append(first + i)
    for start, stop, kind in spills:
        out.setdefault(CLASSES[kind], []).extend(
            q for q in range(start, stop) if ram is None or q in ram)
    return out


class Everything:
    def __contains__(self, pfn: object) -> bool:
        return True


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("layout", [NEW, FLAG_BIT, OLD], ids=["mapcount", "flag", "dtor"])
@pytest.mark.parametrize("level", [31, 1, 2, 4, 6, 8, 16, 17, 30])
def test_whole_array_decides_as_page_by_page(seed, layout, level):
    rng = random.Random(seed * 1000 + level)
    p = replace(layout, level=level)
    count, first = 2048, 1 << 15
    array = struct_pages(rng, count)
    holes = seed % 2 == 1
    ram = {first + i for i in range(count) if not holes or rng.random() < 0.9} if holes else None
    # Blocks may run past the array (into the next section), or be cut at max_pfn.
    for max_pfn in (first + count + 4096, first + count):
        want = reference(array, first, count, Everything() if ram is None else ram, max_pfn, p)
        assert ours(array, first, count, ram, max_pfn, p) == want


def test_the_test_arrays_hit_every_class():
    rng = random.Random(1)
    got = reference(struct_pages(rng, 4096), 0, 4096, Everything(), 1 << 20, NEW)
    assert set(got) == set(CLASSES)
    got = reference(struct_pages(rng, 4096), 0, 4096, Everything(), 1 << 20, OLD)
    assert set(got) == set(CLASSES) - {"offline"}  # (no PAGE_OFFLINE_MAPCOUNT_VALUE)


def test_decision_lists_the_pfns_its_bits_set():
    bits = bytearray(4)
    for pfn in (0, 7, 8, 30):
        bits[pfn >> 3] |= 1 << (pfn & 7)
    assert Decision({"free": 4}, bytes(bits)).pfns() == [0, 7, 8, 30]
    assert Decision().pfns() == []


@pytest.mark.parametrize("seed", range(20))
def test_bitmap_runs_and_clear_bits(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 300)
    b, other = Bitmap(n), Bitmap(n)
    for pfn in range(n):
        if rng.random() < 0.6:
            b.set(pfn)
        if rng.random() < 0.3:
            other.set(pfn)
    first = rng.randrange(n)
    count = rng.randrange(n - first + 1)
    runs = b.runs(first, count)
    assert [q for start, k in runs for q in range(start, start + k)] == [
        q for q in range(first, first + count) if q in b]
    assert all(start + k not in b or start + k == first + count for start, k in runs)
    assert b.any_set(first, count) == bool(runs)
    want = [q for q in range(n) if q in b and q not in other]
    b.clear_bits(bytes(other.bits))
    assert [q for q in range(n) if q in b] == want
