"""The guest kernel's log, read from its memory by the layouts VMCOREINFO gives.

Two generations of the log exist, and VMCOREINFO says which one a kernel has:

* Linux 5.10 on: the lockless printk ring buffer (``prb``). Descriptors (a
  ring of ``prb_desc``, each with a state and an id in ``state_var``) point
  into a ring of text blocks, each block starting with its descriptor's id;
  a parallel ring of ``printk_info`` holds sequence numbers and timestamps.
* Linux 3.5 to 5.9: ``log_buf``, one ring of variable-length ``printk_log``
  records between ``log_first_idx`` and ``log_next_idx``.

The guest may be running: a record is kept only if its descriptor says the
same (same id, committed or finalized, same text block) before and after its
text is copied, its text block carries its id, and its sequence number fits
its place in the ring, which is how the kernel's own readers tell a record
overwritten under them. Records that changed while read are read again.

The text output is ``makedumpfile --dump-dmesg``'s, byte for byte.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from livedump.errors import GuestKernelError
from livedump.guest.kernel import Kernel

# The descriptor's state, in the top two bits of state_var (printk_ringbuffer.h).
_SV_BITS = 64
_FLAGS_SHIFT = _SV_BITS - 2
_ID_MASK = (1 << _FLAGS_SHIFT) - 1
_RESERVED, _COMMITTED, _FINALIZED, _REUSABLE = 0, 1, 2, 3
_CPU_CALLER = 0x80000000  # caller_id: a CPU number, else a thread's
# Reads of a log that keeps changing under them, before giving up.
_ATTEMPTS = 8


@dataclass(frozen=True)
class Record:
    """One message of the kernel's log."""

    seq: int | None  # None for log_buf, whose records do not carry theirs
    ts_nsec: int
    level: int
    facility: int
    caller: int | None  # the raw caller_id (thread or CPU), where VMCOREINFO places it
    text: bytes
    final: bool = True  # False: committed but still open to a continuation line

    @property
    def caller_name(self) -> str | None:
        """``T<pid>`` or ``C<cpu>``, as the kernel and makedumpfile print it."""
        if self.caller is None:
            return None
        kind = "C" if self.caller & _CPU_CALLER else "T"
        return f"{kind}{self.caller & ~_CPU_CALLER}"

    def as_json(self) -> dict[str, object]:
        return {"sequence": self.seq, "timestamp": round(self.ts_nsec / 1e9, 6),
                "timestamp_ns": self.ts_nsec, "level": self.level,
                "facility": self.facility, "caller": self.caller_name,
                "text": self.text.decode("utf-8", errors="backslashreplace")}


def format_record(record: Record, caller: bool = False) -> str:
    """The record as ``makedumpfile --dump-dmesg`` prints it, newline included:
    ``[seconds.micros] text``, continuation lines indented under the text,
    bytes outside printable ASCII and white space as C's printf shows a
    signed char (``\\x01``, ``\\xffffffc3``). ``caller`` adds the thread or CPU
    column that makedumpfile 1.7.5 and later print."""
    seconds, nanos = divmod(record.ts_nsec, 1_000_000_000)
    prefix = f"[{seconds:5d}.{nanos // 1000:06d}] "
    if caller and record.caller_name is not None:
        prefix += f"[{record.caller_name:>8}] "
    indent = "\n" + " " * len(prefix)
    return prefix + record.text.decode("latin-1").translate(_ESCAPES).replace(
        "\n", indent) + "\n"


def _escape(byte: int) -> str:
    if 0x20 <= byte < 0x7F or byte in b"\t\n\v\f\r":
        return chr(byte)
    return f"\\x{byte:02x}" if byte < 0x80 else f"\\xffffff{byte:02x}"


_ESCAPES = {b: _escape(b) for b in range(256)}


class Log(Protocol):
    """A kernel log: its records as they stand, and what it is, for messages."""

    kind: str

    def records(self, after: int | None = None) -> list[Record]:
        """The records there are now, oldest first; with ``after``, only those past
        that position (a sequence number, or a :meth:`position`)."""
        ...

    def position(self, records: list[Record]) -> int | None:
        """Where a reader that has seen ``records`` (the last :meth:`records`) stands."""
        ...

    def moved(self) -> bool:
        """Whether anything may have been logged since the last :meth:`records`:
        one small read, so that a follower waits at no cost."""
        ...


def open_log(kernel: Kernel) -> Log:
    """The log of ``kernel``, of the generation its VMCOREINFO describes."""
    if kernel.symbol("prb") is not None:
        return Ringbuffer(kernel)
    if kernel.symbol("log_buf") is not None and kernel.symbol("log_first_idx") is not None:
        return LogBuf(kernel)
    if kernel.symbol("log_buf") is not None:
        raise GuestKernelError(f"Linux {kernel.release} keeps its log as plain text (before "
                               "3.5): not supported")
    raise GuestKernelError(f"the VMCOREINFO of Linux {kernel.release} describes no kernel "
                           "log (neither prb nor log_buf)")


@dataclass(frozen=True)
class _Desc:
    state_var: int
    begin: int
    next: int


class Ringbuffer:
    """The lockless printk ring buffer of Linux 5.10 and later."""

    kind = "printk ring buffer"

    def __init__(self, kernel: Kernel) -> None:
        k = self.k = kernel
        prb_symbol = kernel.symbol("prb")
        assert prb_symbol is not None
        self._prb = k.u64(prb_symbol, "prb pointer")
        ring = k.offset("printk_ringbuffer.desc_ring")
        text = k.offset("printk_ringbuffer.text_data_ring")
        header = k.read(self._prb, k.size("printk_ringbuffer"), "printk ring buffer")
        count_bits = _u32(header, ring + k.offset("prb_desc_ring.count_bits"))
        size_bits = _u32(header, text + k.offset("prb_data_ring.size_bits"))
        if not (0 < count_bits < 32 and 0 < size_bits < 32):
            raise GuestKernelError(f"the printk ring buffer of Linux {k.release} is not "
                                   f"initialized (count_bits {count_bits}, size_bits "
                                   f"{size_bits})")
        self.count = 1 << count_bits
        self.data_size = 1 << size_bits
        self._descs = _u64(header, ring + k.offset("prb_desc_ring.descs"))
        self._infos = _u64(header, ring + k.offset("prb_desc_ring.infos"))
        self._data = _u64(header, text + k.offset("prb_data_ring.data"))
        counter = k.offset("atomic_long_t.counter")
        self._head = ring + k.offset("prb_desc_ring.head_id") + counter
        self._tail = ring + k.offset("prb_desc_ring.tail_id") + counter
        self._desc_size = k.size("prb_desc")
        self._state = k.offset("prb_desc.state_var") + counter
        lpos = k.offset("prb_desc.text_blk_lpos")
        self._begin = lpos + k.offset("prb_data_blk_lpos.begin")
        self._next = lpos + k.offset("prb_data_blk_lpos.next")
        self._info_size = k.size("printk_info")
        self._seq = k.offset("printk_info.seq")
        self._ts = k.offset("printk_info.ts_nsec")
        self._text_len = k.offset("printk_info.text_len")
        self._caller = k.optional_offset("printk_info.caller_id")
        self._last_head: int | None = None

    def position(self, records: list[Record]) -> int | None:
        """The sequence number of the last of ``records``."""
        return records[-1].seq if records else None

    def moved(self) -> bool:
        """Whether the newest descriptor is another than at the last read, or was
        still open then."""
        head = self.k.u64(self._prb + self._head, "printk ring buffer head")
        return head != self._last_head or self._open

    _open = True

    def records(self, after: int | None = None) -> list[Record]:
        for _ in range(_ATTEMPTS):
            found = self._read(after)
            if found is not None:
                return found
        raise GuestKernelError(f"the printk ring buffer of Linux {self.k.release} changed "
                               f"under each of {_ATTEMPTS} reads; try --pause")

    def _read(self, after: int | None) -> list[Record] | None:
        """One read of every record; None if one of them changed while it was read."""
        k = self.k
        header = k.read(self._prb, k.size("printk_ringbuffer"), "printk ring buffer")
        head, tail = _u64(header, self._head), _u64(header, self._tail)
        if (head - tail) & _ID_MASK >= self.count:
            return None  # a torn head/tail pair
        ids = list(_ids(tail, head))
        before = self._read_descs(ids)
        infos = k.read(self._infos, self.count * self._info_size, "printk_info ring")
        data = k.read(self._data, self.data_size, "printk text ring")
        after_descs = self._read_descs(ids)
        records: list[Record] = []
        base: int | None = None  # seq - id, the same for every record in order
        for id_, desc, now in zip(ids, before, after_descs, strict=True):
            state = _state(id_, desc.state_var)
            if state not in (_COMMITTED, _FINALIZED):
                continue  # reusable (the tail), reserved (being written), or recycled
            if _state(id_, now.state_var) not in (_COMMITTED, _FINALIZED):
                continue  # recycled while we read: gone from the log
            if now != desc:
                return None  # changing (finalized, or extended): read again
            info = (id_ % self.count) * self._info_size
            seq = _u64(infos, info + self._seq)
            if seq % self.count != id_ % self.count:
                return None  # its info is not yet, or no longer, this record's
            if base is None:
                base = (seq - id_) & _ID_MASK
            elif (seq - id_) & _ID_MASK != base:
                return None
            text = self._text(id_, desc, infos, info, data)
            if text is None or (after is not None and seq <= after):
                continue
            raw = infos[info + self._text_len + 3]  # facility, then flags:5 and level:3
            records.append(Record(
                seq=seq, ts_nsec=_u64(infos, info + self._ts), level=raw >> 5,
                facility=infos[info + self._text_len + 2],
                caller=None if self._caller is None else _u32(infos, info + self._caller),
                text=text, final=state == _FINALIZED))
        self._last_head = head
        self._open = any(not r.final for r in records)
        return records

    def _read_descs(self, ids: list[int]) -> list[_Desc]:
        """The descriptors of ``ids``, from one read of the whole ring."""
        if not ids:
            return []
        k, size = self.k, self._desc_size
        ring = k.read(self._descs, self.count * size, "printk descriptor ring")
        out = []
        for id_ in ids:
            at = (id_ % self.count) * size
            out.append(_Desc(_u64(ring, at + self._state), _u64(ring, at + self._begin),
                             _u64(ring, at + self._next)))
        return out

    def _text(self, id_: int, desc: _Desc, infos: bytes, info: int,
              data: bytes) -> bytes | None:
        """The record's text from the text ring, where its block is whole and its own;
        None for a record without text."""
        size = self.data_size
        begin, end = desc.begin % size, desc.next % size
        if begin == end:
            return None  # data-less (a failed or empty reservation)
        if begin > end:
            begin = 0  # the block wrapped: its data is at the ring's start
        if end - begin < 8 or int.from_bytes(data[begin : begin + 8], "little") != id_:
            return None  # not this record's block: overwritten
        begin += 8
        length = min(int.from_bytes(infos[info + self._text_len : info + self._text_len + 2],
                                    "little"), end - begin)  # truncated messages
        return data[begin : begin + length]


class LogBuf:
    """The ``log_buf`` of ``printk_log`` records, Linux 3.5 to 5.9."""

    kind = "log_buf"

    def __init__(self, kernel: Kernel) -> None:
        k = self.k = kernel
        symbols = {name: k.symbol(name) for name in
                   ("log_buf", "log_buf_len", "log_first_idx", "log_next_idx")}
        missing = [name for name, va in symbols.items() if va is None]
        if missing:
            raise GuestKernelError(f"the VMCOREINFO of Linux {k.release} lacks "
                                   f"{', '.join(missing)}")
        self._symbols = {name: va for name, va in symbols.items() if va is not None}
        self._header = k.size("printk_log")
        self._ts = k.offset("printk_log.ts_nsec")
        self._len = k.offset("printk_log.len")
        self._text_len = k.offset("printk_log.text_len")
        # facility, then flags:5 and level:3, follow dict_len (the layout since 3.5).
        dict_len = k.optional_offset("printk_log.dict_len")
        self._flags = None if dict_len is None else dict_len + 2
        self._caller = k.optional_offset("printk_log.caller_id")

    def position(self, records: list[Record]) -> int | None:
        return self._next_seen

    def moved(self) -> bool:
        return self.k.u32(self._symbols["log_next_idx"], "log_next_idx") != self._next_seen

    _next_seen: int | None = None

    def records(self, after: int | None = None) -> list[Record]:
        for _ in range(_ATTEMPTS):
            found = self._read(after)
            if found is not None:
                return found
        raise GuestKernelError(f"the log_buf of Linux {self.k.release} changed under each "
                               f"of {_ATTEMPTS} reads; try --pause")

    def _read(self, after: int | None) -> list[Record] | None:
        """One read: the records from ``log_first_idx`` (or ``after``, an index this
        reader stopped at) to ``log_next_idx``; None if the kernel overwrote the
        records being read."""
        k, s = self.k, self._symbols
        buf = k.u64(s["log_buf"], "log_buf pointer")
        length = k.u32(s["log_buf_len"], "log_buf_len")
        first = k.u32(s["log_first_idx"], "log_first_idx")
        end = k.u32(s["log_next_idx"], "log_next_idx")
        if not 0 < length <= 1 << 31 or first >= length or end >= length:
            raise GuestKernelError(f"the log_buf of Linux {k.release} is not initialized")
        data = k.read(buf, length, "log_buf")
        first_after = k.u32(s["log_first_idx"], "log_first_idx")
        try:
            positions = list(self._walk(data, first, end))
        except GuestKernelError:
            return None  # records rewritten under the read
        # Records the kernel dropped while we read (log_first_idx moved past them).
        if first_after != first:
            if first_after not in positions:
                return None  # it wrapped past all we read
            positions = positions[positions.index(first_after):]
        # Past where the last read stopped, where that is still in the log.
        if after is not None and after in positions:
            positions = positions[positions.index(after):]
        elif after is not None and after == end:
            positions = []
        records = [self._record(data, p) for p in positions]
        self._next_seen = end
        return records

    def _walk(self, data: bytes, start: int, end: int) -> Iterator[int]:
        """The offsets of the records from ``start`` to ``end``: a record of length 0
        marks the end of the buffer, and the next record is at its start."""
        at, seen = start, 0
        while at != end:
            if at + self._header > len(data):
                raise GuestKernelError("a log_buf record runs past the buffer's end")
            size = _u16(data, at + self._len)
            if size == 0:
                at = 0
                continue
            yield at
            at += size
            seen += 1
            if seen > len(data) // max(self._header, 1):
                raise GuestKernelError("the log_buf records do not lead to log_next_idx")

    def _record(self, data: bytes, at: int) -> Record:
        text_len = _u16(data, at + self._text_len)
        text = data[at + self._header : at + self._header + text_len]
        flags = 0 if self._flags is None else data[at + self._flags + 1]
        return Record(
            seq=None, ts_nsec=_u64(data, at + self._ts), level=flags >> 5,
            facility=0 if self._flags is None else data[at + self._flags],
            caller=None if self._caller is None else _u32(data, at + self._caller),
            text=text)


def _ids(tail: int, head: int) -> Iterator[int]:
    """The descriptor ids from ``tail`` to ``head``, both included (ids wrap)."""
    for step in range(((head - tail) & _ID_MASK) + 1):
        yield (tail + step) & _ID_MASK


def _state(id_: int, state_var: int) -> int | None:
    """The descriptor's state, or None if it belongs to another id."""
    if state_var & _ID_MASK != id_:
        return None
    return state_var >> _FLAGS_SHIFT & 3


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "little")
