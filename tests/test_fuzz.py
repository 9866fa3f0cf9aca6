"""Garbled monitor replies and command lines: our own clear error, or a sound result."""

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from livedump.errors import MonitorError
from livedump.qmp import ram_map as locate
from livedump.vm.process import parse_config, parse_qmp_options

from .conftest import SESSIONS

MTREE = [
    next(x["return"] for x in json.loads(p.read_text())["exchanges"]
         if x["arguments"] == {"command-line": "info mtree -f"})
    for p in SESSIONS
]


def check_flatview(text: str) -> None:
    try:
        ranges = locate.parse_flatview(text)
    except MonitorError as e:
        assert "\n" not in str(e)  # One line for the user.
        return
    for a, b in itertools.pairwise(ranges):
        assert a.gpa + a.size <= b.gpa
    assert all(r.size > 0 for r in ranges)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_random_text_as_flatview(text):
    check_flatview(text)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MTREE), st.data())
def test_mutated_real_flatview(text, data):
    """Real replies with a slice cut out, doubled or replaced by random text."""
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 200)))
    piece = data.draw(st.sampled_from(["", text[start:end] * 2, data.draw(st.text(max_size=40))]))
    check_flatview(text[:start] + piece + text[end:])


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_random_gpa2hva_reply(text):
    try:
        hva, name = locate.parse_gpa2hva(text)
    except MonitorError:
        return
    assert hva >= 0 and isinstance(name, str)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["-qmp", "-mon", "-chardev", "--qmp", "-S", "-m", "-readconfig"])
                | st.text(max_size=60), max_size=12),
       st.lists(st.text(max_size=60), max_size=12))
def test_random_command_lines(options, values):
    argv = ["qemu-system-x86_64"] + [x for pair in zip(options, values, strict=False) for x in pair]
    for e in parse_qmp_options(argv, "/cwd"):
        assert e.address is None or isinstance(e.address, (str, tuple))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(['[chardev "q"]', "[mon]", '  mode = "control"',
                                 '  chardev = "q"', '  backend = "socket"', "# [mon]"])
                | st.text(max_size=60), max_size=12))
def test_random_config_files(lines):
    for group, props in parse_config("\n".join(lines)):
        assert group and "]" not in group and all(isinstance(v, str) for v in props.values())
