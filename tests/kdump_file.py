"""A reader of kdump-compressed files for the tests, written from makedumpfile's
``diskdump_mod.h`` apart from livedump's writer: what crash and libkdumpfile read."""

import struct
import zlib
from dataclasses import dataclass

HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")
SUB = struct.Struct("<QiiQQqQqQqQQQQ")
DESC = struct.Struct("<qIIQ")


@dataclass
class KdumpFile:
    data: bytes
    page: int
    status: int
    nr_cpus: int
    utsname: bytes
    dump_level: int
    phys_base: int
    max_mapnr: int
    notes: bytes
    vmcoreinfo: bytes
    ram: bytes  # bitmap 1
    dumpable: bytes  # bitmap 2
    descs: dict[int, tuple[int, int, int]]  # pfn -> offset, size, flags

    def pfns(self, bitmap: bytes) -> list[int]:
        return [i for i in range(self.max_mapnr) if bitmap[i >> 3] >> (i & 7) & 1]

    def page_at(self, pfn: int) -> bytes:
        offset, size, flags = self.descs[pfn]
        raw = self.data[offset:offset + size]
        if flags & 0x1:
            return zlib.decompress(raw)
        if flags & 0x2:
            import lzo
            return lzo.decompress(raw, False, self.page)
        if flags & 0x4:
            import cramjam
            return bytes(cramjam.snappy.decompress_raw(raw))
        if flags & 0x20:
            import zstandard
            return zstandard.ZstdDecompressor().decompress(raw, max_output_size=self.page)
        assert flags == 0, flags
        assert size == self.page
        return raw


def read(data: bytes) -> KdumpFile:
    h = HEADER.unpack_from(data)
    signature, version, uts, _, _, status, block, sub_blocks, bitmap_blocks = h[:9]
    nr_cpus = h[-1]
    assert signature == b"KDUMP   " and version == 6
    s = SUB.unpack_from(data, block)
    phys_base, level, _, _, _, off_info, size_info, off_note, size_note = s[:9]
    max_mapnr = s[13]
    bitmap_at = (1 + sub_blocks) * block
    half = bitmap_blocks * block // 2
    ram = data[bitmap_at:bitmap_at + half]
    dumpable = data[bitmap_at + half:bitmap_at + 2 * half]
    k = KdumpFile(data, block, status, nr_cpus, uts, level, phys_base, max_mapnr,
                  data[off_note:off_note + size_note], data[off_info:off_info + size_info],
                  ram, dumpable, {})
    at = bitmap_at + 2 * half
    for pfn in k.pfns(dumpable):
        k.descs[pfn] = DESC.unpack_from(data, at)[:3]
        at += DESC.size
    return k


def unflatten(stream: bytes) -> bytes:
    """The file a flattened stream describes: ``makedumpfile -R`` in Python."""
    assert stream.startswith(b"makedumpfile\0")
    out = bytearray()
    at = 4096
    while True:
        offset, size = struct.unpack_from(">qq", stream, at)
        at += 16
        if offset == -1:
            assert size == -1 and at == len(stream)
            return bytes(out)
        if len(out) < offset + size:
            out.extend(bytes(offset + size - len(out)))
        out[offset:offset + size] = stream[at:at + size]
        at += size
