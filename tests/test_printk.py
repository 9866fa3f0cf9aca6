"""The guest kernel's log read from its memory (livedump.guest): against a real
guest's memory as recorded (integration/record_dmesg.py) and makedumpfile's
text of the same guest, and against logs built here for what a recording
cannot show (a log changing under the read, the pre-5.10 log_buf)."""

import gzip
import struct
from pathlib import Path

import pytest

from livedump.errors import GuestKernelError
from livedump.guest import printk
from livedump.guest.kernel import Kernel
from livedump.guest.printk import LogBuf, Record, Ringbuffer, format_record, open_log
from livedump.vmcore.arch import lookup

DATA = Path(__file__).parent / "data" / "dmesg"
RECORDED = "linux-6.1.0-57-amd64"
X86_64 = lookup("x86_64")


class Memory:
    """Sparse guest-physical memory: what was recorded, or built here."""

    def __init__(self) -> None:
        self.bytes: dict[int, bytearray] = {}  # page -> its 4 KiB

    def write(self, gpa: int, data: bytes) -> None:
        for i, b in enumerate(data):
            page = self.bytes.setdefault((gpa + i) & ~4095, bytearray(4096))
            page[(gpa + i) & 4095] = b

    def read(self, gpa: int, length: int) -> bytes | None:
        out = bytearray()
        for at in range(gpa & ~4095, gpa + length, 4096):
            if at not in self.bytes:
                return None
            out += self.bytes[at]
        start = gpa & 4095
        return bytes(out[start : start + length])


def entries_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def recorded() -> tuple[dict[str, str], Memory]:
    memory = Memory()
    raw = gzip.decompress((DATA / f"{RECORDED}.reads.gz").read_bytes())
    at = 0
    while at < len(raw):
        gpa, length = struct.unpack_from("<QI", raw, at)
        memory.write(gpa, raw[at + 12 : at + 12 + length])
        at += 12 + length
    return entries_of((DATA / f"{RECORDED}.vmcoreinfo").read_text()), memory


@pytest.fixture(scope="module")
def recording():
    return recorded()


def test_recorded_log_is_makedumpfiles_text(recording):
    entries, memory = recording
    log = open_log(Kernel(entries, X86_64, memory.read))
    assert isinstance(log, Ringbuffer)
    text = "".join(format_record(r) for r in log.records())
    assert text == (DATA / f"{RECORDED}.makedumpfile.txt").read_text(errors="surrogateescape")


def test_recorded_records_carry_sequence_level_and_caller(recording):
    entries, memory = recording
    records = open_log(Kernel(entries, X86_64, memory.read)).records()
    assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + len(records)))
    assert records[0].text.startswith(b"Linux version 6.1.0")
    [awkward] = [r for r in records if r.text.startswith(b"LIVEDUMP-KMSG-BYTES")]
    assert awkward.level == 4  # the <4> it was written with
    assert awkward.facility == 1  # LOG_USER: written to /dev/kmsg
    assert awkward.caller_name.startswith("T")
    assert awkward.as_json()["text"] == "LIVEDUMP-KMSG-BYTES tab\there café bell\x07 end"
    assert records[0].as_json()["caller"] == "T0"
    # makedumpfile 1.7.5's caller column.
    assert format_record(records[0], caller=True).startswith("[    0.000000] [      T0] Linux")


def test_later_reads_give_only_newer_records(recording):
    entries, memory = recording
    log = open_log(Kernel(entries, X86_64, memory.read))
    records = log.records()
    assert log.records(after=records[-3].seq) == records[-2:]
    assert log.records(after=log.position(records)) == []


class Interfering:
    """The recorded memory, changed by ``change(memory, n)`` before the n-th read
    of the descriptor ring: a guest that logs while it is read."""

    def __init__(self, entries: dict[str, str], memory: Memory, change) -> None:
        self.memory, self.change, self.seen = memory, change, 0
        self.descs: int | None = None
        self.kernel = Kernel(entries, X86_64, self.read)
        self.ring = open_log(self.kernel)
        assert isinstance(self.ring, Ringbuffer)
        self.descs = self.kernel.phys(self.ring._descs)

    def read(self, gpa: int, length: int) -> bytes | None:
        if gpa == self.descs:
            self.seen += 1
            self.change(self.memory, self.seen)
        return self.memory.read(gpa, length)


def copy(memory: Memory) -> Memory:
    out = Memory()
    out.bytes = {k: bytearray(v) for k, v in memory.bytes.items()}
    return out


def state_at(ring: Ringbuffer, descs: int, id_: int) -> int:
    return descs + (id_ % ring.count) * ring._desc_size + ring._state


def id_of(ring: Ringbuffer, kernel: Kernel, seq: int) -> int:
    """The descriptor id of the record with sequence number ``seq``."""
    tail = kernel.u64(ring._prb + ring._tail, "tail")
    return next(id_ for id_ in printk._ids(tail, (tail + ring.count - 1) & printk._ID_MASK)
                if id_ % ring.count == seq % ring.count)


def test_a_record_recycled_while_read_is_left_out(recording):
    entries, original = recording
    everything = open_log(Kernel(entries, X86_64, original.read)).records()
    victim = everything[5]  # an old record, in the middle of the log

    def recycle(m: Memory, n: int) -> None:
        if n == 2:  # after the texts were copied, the kernel made it reusable
            victim_id = id_of(guest.ring, guest.kernel, victim.seq)
            m.write(state_at(guest.ring, guest.descs, victim_id),
                    struct.pack("<Q", (printk._REUSABLE << 62) | victim_id))

    guest = Interfering(entries, copy(original), recycle)
    records = guest.ring.records()
    assert records == [r for r in everything if r != victim]
    assert guest.seen == 2  # gone is gone: no need to read again


def test_a_record_that_changes_while_read_is_read_again(recording):
    entries, original = recording
    everything = open_log(Kernel(entries, X86_64, original.read)).records()
    last = everything[-1]

    def reopen(m: Memory, n: int) -> None:
        # Between the first read's two looks, the newest record is reopened
        # (committed, not final) for a continuation; by the second read, final again.
        last_id = id_of(guest.ring, guest.kernel, last.seq)
        state = printk._COMMITTED if n == 2 else printk._FINALIZED
        m.write(state_at(guest.ring, guest.descs, last_id),
                struct.pack("<Q", (state << 62) | last_id))

    guest = Interfering(entries, copy(original), reopen)
    assert guest.ring.records() == everything
    assert guest.seen == 4  # two reads, the first refused


def test_a_log_that_never_holds_still_is_an_error(recording):
    entries, original = recording
    last = open_log(Kernel(entries, X86_64, original.read)).records()[-1]

    def toggle(m: Memory, n: int) -> None:  # extended, again and again
        last_id = id_of(guest.ring, guest.kernel, last.seq)
        state = printk._COMMITTED if n % 2 else printk._FINALIZED
        m.write(state_at(guest.ring, guest.descs, last_id),
                struct.pack("<Q", (state << 62) | last_id))

    guest = Interfering(entries, copy(original), toggle)
    with pytest.raises(GuestKernelError, match="changed under each of 8 reads; try --pause"):
        guest.ring.records()


def test_a_text_block_overwritten_is_not_taken(recording):
    entries, original = recording
    memory = copy(original)
    kernel = Kernel(entries, X86_64, memory.read)
    ring = open_log(kernel)
    assert isinstance(ring, Ringbuffer)
    everything = ring.records()
    first_id = id_of(ring, kernel, everything[0].seq)
    # Its block now starts with another id: the text is another record's.
    at = kernel.phys(ring._descs) + (first_id % ring.count) * ring._desc_size
    begin = struct.unpack("<Q", memory.read(at + ring._begin, 8))[0] % ring.data_size
    memory.write(kernel.phys(ring._data) + begin, struct.pack("<Q", first_id + 1))
    assert ring.records() == everything[1:]


# ---- log_buf (3.5 to 5.9), built here -----------------------------------------------

KERNEL_BASE = 0xFFFFFFFF81000000  # phys_base 0: kernel-image address - this = physical
HEADER = 16  # printk_log: ts_nsec u64, len u16, text_len u16, dict_len u16, facility, flags


def log_buf_kernel(records: list[tuple[int, int, bytes]], wrap_after: int | None = None,
                   size: int = 1024) -> tuple[Kernel, Memory]:
    """A kernel with a log_buf holding ``records`` (ts_nsec, level, text), the
    ones from ``wrap_after`` on at the start of the buffer after an end marker."""
    memory = Memory()
    buf_va, ptr_va, len_va, first_va, next_va = (KERNEL_BASE + 0x100000 + 0x1000 * i
                                                 for i in range(5))
    body = bytearray(size)
    first = at = 200 if wrap_after is not None else 0
    for i, (ts, level, text) in enumerate(records):
        if i == wrap_after:
            body[at : at + HEADER] = bytes(HEADER)  # len 0: the end of the buffer
            at = 0
        length = HEADER + len(text) + (-(HEADER + len(text)) % 8)
        body[at : at + HEADER] = struct.pack("<QHHHBB", ts, length, len(text), 0, 0,
                                             level << 5)
        body[at + HEADER : at + HEADER + len(text)] = text
        at += length
    memory.write(buf_va - KERNEL_BASE + 0x1000000, bytes(body))
    memory.write(ptr_va - KERNEL_BASE + 0x1000000, struct.pack("<Q", buf_va))
    memory.write(len_va - KERNEL_BASE + 0x1000000, struct.pack("<I", size))
    memory.write(first_va - KERNEL_BASE + 0x1000000, struct.pack("<I", first))
    memory.write(next_va - KERNEL_BASE + 0x1000000, struct.pack("<I", at))
    entries = {
        "OSRELEASE": "5.4.0", "PAGESIZE": "4096", "NUMBER(phys_base)": "0",
        "SYMBOL(log_buf)": f"{ptr_va:x}", "SYMBOL(log_buf_len)": f"{len_va:x}",
        "SYMBOL(log_first_idx)": f"{first_va:x}", "SYMBOL(log_next_idx)": f"{next_va:x}",
        "SIZE(printk_log)": str(HEADER), "OFFSET(printk_log.ts_nsec)": "0",
        "OFFSET(printk_log.len)": "8", "OFFSET(printk_log.text_len)": "10",
        "OFFSET(printk_log.dict_len)": "12",
    }
    return Kernel(entries, X86_64, memory.read), memory


def test_log_buf_records_in_order_across_the_wrap():
    messages = [(1_500_000_000, 6, b"first"), (2_000_001_000, 3, b"second\nline"),
                (3_000_000_000, 4, b"third \x01")]
    kernel, _ = log_buf_kernel(messages, wrap_after=2)
    log = open_log(kernel)
    assert isinstance(log, LogBuf)
    records = log.records()
    assert [(r.ts_nsec, r.level, r.text) for r in records] == messages
    assert "".join(format_record(r) for r in records) == (
        "[    1.500000] first\n"
        "[    2.000001] second\n"
        "               line\n"
        "[    3.000000] third \\x01\n")
    assert records[0].seq is None
    assert log.records(after=log.position(records)) == []


def test_no_log_in_vmcoreinfo_is_an_error():
    kernel = Kernel({"OSRELEASE": "6.1.0", "NUMBER(phys_base)": "0"}, X86_64,
                    lambda gpa, n: None)
    with pytest.raises(GuestKernelError, match="describes no kernel log"):
        open_log(kernel)


@pytest.mark.parametrize("arch", ["aarch64-be", "ppc64-le", "386"])
def test_only_x86_64_and_aarch64_kernels_are_read(arch):
    with pytest.raises(GuestKernelError, match=f"not supported on {arch} yet"):
        Kernel({"OSRELEASE": "6.1.0"}, lookup(arch), lambda gpa, n: None)


def test_text_is_escaped_as_makedumpfile_prints_it():
    record = Record(seq=1, ts_nsec=12_345_678_901, level=6, facility=0, caller=0x80000001,
                    text=b"a\tb\x1b[0m \xe2\x82\xac\r\nnext")
    assert format_record(record) == (
        "[   12.345678] a\tb\\x1b[0m \\xffffffe2\\xffffff82\\xffffffac\r\n"
        "               next\n")
    assert format_record(record, caller=True).startswith("[   12.345678] [      C1] a\t")
