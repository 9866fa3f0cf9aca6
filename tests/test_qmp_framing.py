"""Whole QMP messages from lines, as QEMU 7.2 sends them compact and pretty."""

import json

import pytest

from livedump.qmp.framing import Framer, TooLong

# QEMU 7.2's -qmp-pretty, byte for byte: its greeting, then replies.
PRETTY = (
    b'{\r\n    "QMP": {\r\n        "version": {\r\n            "qemu": {\r\n'
    b'                "micro": 22,\r\n                "minor": 2,\r\n'
    b'                "major": 7\r\n            },\r\n'
    b'            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n        },\r\n'
    b'        "capabilities": [\r\n            "oob"\r\n        ]\r\n    }\r\n}\r\n'
    b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    b'{\r\n    "return": {\r\n        "status": "running",\r\n        "singlestep": false,\r\n'
    b'        "running": true\r\n    },\r\n    "id": [\r\n        1,\r\n        "a"\r\n'
    b'    ]\r\n}\r\n'
    b'{\r\n    "return": "FlatView #0\\r\\n AS \\"memory\\", root: {system]\\r\\n"\r\n}\r\n'
)


def messages(data: bytes, limit: int = 1 << 20) -> list[bytes]:
    framer = Framer(limit)
    found = [framer.add(line) for line in data.splitlines(keepends=True)]
    return [m for m in found if m is not None]


def test_pretty_messages_come_whole():
    got = [json.loads(m) for m in messages(PRETTY)]
    assert [list(m) for m in got] == [["QMP"], ["return"], ["return", "id"], ["return"]]
    assert got[2]["id"] == [1, "a"]
    # Brackets and escaped quotes inside a string do not count.
    assert got[3]["return"] == 'FlatView #0\r\n AS "memory", root: {system]\r\n'


def test_compact_lines_pass_as_they_are():
    lines = [b'{"QMP": {"version": {}, "capabilities": []}}\r\n', b'{"return": {}}\r\n',
             b"not JSON at all\n", b"[]\n"]
    assert messages(b"".join(lines)) == lines


def test_a_message_that_never_closes_fails_at_the_limit():
    framer = Framer(limit=100)
    assert framer.add(b"{\n") is None
    assert framer.add(b'    "a": [\n') is None
    with pytest.raises(TooLong, match="more than 100 bytes") as e:
        for _ in range(10):
            assert framer.add(b'        "' + b"x" * 20 + b'",\n') is None
    assert e.value.raw.startswith(b'{\n    "a": [\n        "xxx')
    # And starts afresh.
    assert framer.add(b'{"return": {}}\n') == b'{"return": {}}\n'


def test_an_unfinished_message_is_taken_as_it_is():
    framer = Framer(limit=100)
    assert framer.add(b"{\n") is None
    assert framer.add(b'    "return": {\n') is None
    assert framer.take() == b'{\n    "return": {\n'
    assert framer.add(b'{"return": {}}\n') == b'{"return": {}}\n'
