"""Whole QMP messages out of a monitor's lines, compact or pretty-printed.

QEMU sends each QMP message on one line, unless the monitor is pretty
(``-qmp-pretty``, ``-mon ...,pretty=on``): then a message spans lines, the
first holding only ``{``, the last its closing ``}``. Readers that take a
line for a message (qemu.qmp's, the guardian's) hand their lines to a
:class:`Framer` and get whole messages back. This module imports nothing,
so the guardian can use it at no cost.
"""

import re

# What counts for a message's nesting: brackets outside JSON strings (a
# string is matched whole, escapes and all, so brackets in it are skipped).
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}]')
_OPENING = frozenset((b"{", b"["))


class TooLong(ValueError):
    """A message went on past the limit; ``raw`` is what came of it."""

    def __init__(self, raw: bytes, limit: int) -> None:
        super().__init__(f"a QMP message of more than {limit} bytes")
        self.raw = raw


class Framer:
    """Joins the lines of a pretty-printed message; a compact one passes as it is.

    A message is at most ``limit`` bytes, as a line is for the reader that
    feeds us: a monitor that opens a message and never closes it fails at
    the limit, not at the end of memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lines: list[bytes] = []
        self._size = 0
        self._depth = 0

    def add(self, line: bytes) -> bytes | None:
        """The message ``line`` completes, or None if it goes on in the next line.

        Raises :class:`TooLong` for a message longer than the limit.
        """
        if not self._lines and line.strip() != b"{":
            return line  # One line, one message: anything but a pretty message's start.
        self._lines.append(line)
        self._size += len(line)
        for token in _TOKEN.findall(line):
            if token[:1] != b'"':
                self._depth += 1 if token in _OPENING else -1
        if self._depth <= 0:
            return self.take()
        if self._size > self.limit:
            raise TooLong(self.take(), self.limit)
        return None

    def take(self) -> bytes:
        """What lines there are of an unfinished message (at the end of the stream,
        for the parser to judge), and start afresh."""
        message = b"".join(self._lines)
        self._lines, self._size, self._depth = [], 0, 0
        return message
