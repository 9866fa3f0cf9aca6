"""What looking for VMCOREINFO costs the writer thread: ``python3 -m integration.bench_vmcoreinfo``.

Feeds 1 GiB of non-zero data, in the writer's 1 MiB chunks, to the hook
livedump's writer calls for every chunk it writes, and times it: random
bytes, and chunks where every page starts with "O" and ``OSRELEASE=``
begins every 10 bytes but never at a page start (the worst a guest can do
short of real look-alikes, of which only 64 are ever looked at). For scale,
the zero test the writer already makes of every chunk (a 1 MiB memcmp, timed
on zero chunks, where it reads all of them). 64 distinct chunks are cycled,
so caches do not flatter.
"""

import os
import time

from livedump.transfer.copier import CHUNK
from livedump.vmcore.arch import lookup
from livedump.vmcore.blocks import Block
from livedump.vmcore.elf import CoreLayout
from livedump.vmcore.vmcoreinfo import Search

GIB = 1 << 30
DISTINCT = 64


def seconds(chunks: list[bytearray], hook) -> float:
    started = time.perf_counter()
    for i in range(GIB // CHUNK):
        hook(i * CHUNK, chunks[i % DISTINCT], CHUNK)
    return time.perf_counter() - started


def main() -> None:
    arch = lookup("x86_64")
    search = Search(arch, "no CPU notes", to_stdout=False)
    # File offsets are taken as guest-physical addresses: one block at 0, data at 0.
    layout = CoreLayout(arch, [Block(0, GIB, 0)], [], search.room)
    layout.offsets = [0]
    inspect = search.inspector(layout)
    random = [bytearray(os.urandom(CHUNK)) for _ in range(DISTINCT)]
    spam_page = b"O" + b"OSRELEASE=" * 409 + b"zzzzz"
    spam = [bytearray(spam_page * (CHUNK // len(spam_page)) + bytes(CHUNK % len(spam_page)))
            for _ in range(DISTINCT)]
    zero = bytes(CHUNK)
    for name, chunks in (("random bytes", random), ("look-alikes at every offset", spam)):
        scan = seconds(chunks, inspect)
        print(f"1 GiB of {name}: scan {scan * 1000:.1f} ms")
    zeros = [bytearray(CHUNK) for _ in range(DISTINCT)]
    test = seconds(zeros, lambda _o, data, _n: data == zero)
    print(f"for scale, the writer's zero test of 1 GiB: {test * 1000:.1f} ms")


if __name__ == "__main__":
    main()
