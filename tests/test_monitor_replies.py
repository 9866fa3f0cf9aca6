"""Replies no QEMU would send, from a monitor livedump takes for QEMU's
(tests/fake_monitor.py, run as a process named like QEMU): each refused
with one short line and exit 9, the guest never stopped."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def fake_qemu(tmp_path_factory) -> Path:
    """This Python, under a QEMU's name."""
    exe = tmp_path_factory.mktemp("bin") / "qemu-system-x86_64"
    shutil.copy(os.path.realpath(sys.executable), exe)
    return exe


def run(fake_qemu: Path, tmp_path: Path, script: dict, *options: str
        ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """livedump (given ``options``) against a fake monitor following ``script``:
    its result, and what the monitor was sent."""
    sock, log, script_file = tmp_path / "qmp.sock", tmp_path / "log", tmp_path / "script"
    script_file.write_text(json.dumps(script))
    fake = subprocess.Popen([str(fake_qemu), str(HERE / "fake_monitor.py"), str(sock),
                             str(log), str(script_file)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert fake.poll() is None and time.monotonic() < deadline, "no fake monitor"
            time.sleep(0.01)
        out = tmp_path / "out"
        out.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "livedump", "--pid", str(fake.pid), "--qmp", str(sock),
             "--qmp-timeout", "5", *options, str(out / "x.vmcore")], capture_output=True,
            timeout=60)
        sent = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        if result.returncode != 0:
            assert os.listdir(out) == []
        return result, sent
    finally:
        fake.kill()
        fake.wait()


def one_short_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.startswith("livedump: ") and text.endswith("\n") and text.count("\n") == 1
    assert len(text) < 250, len(text)
    return text


def test_the_fake_is_a_monitor_livedump_can_dump_through(fake_qemu, tmp_path):
    """Left to itself, the fake answers as QEMU: its RAM is dumped (so what
    the other tests change is all that makes them fail)."""
    r, sent = run(fake_qemu, tmp_path, {})
    assert r.returncode == 0, r.stderr
    assert [m["execute"] for m in sent].count("stop") == 1
    with open(tmp_path / "out" / "x.vmcore", "rb") as f:
        assert bytes(range(256)) * 16 in f.read()


def test_a_pretty_printed_monitor_is_dumped_through(fake_qemu, tmp_path):
    """-qmp-pretty: every message over several lines, taken whole."""
    r, sent = run(fake_qemu, tmp_path, {"pretty": True})
    assert r.returncode == 0, r.stderr
    assert [m["execute"] for m in sent].count("stop") == 1


@pytest.mark.parametrize("greeting, shown", [
    ("\x00\xffnot json at all", r"b'\x00\xc3\xbfnot json at all\r\n'"),
    ('{"hello": "a JSON object, but no greeting"}', "\"'Greeting' object requires 'QMP' member\""),
    ("x" * 100_000, "... ("),
])
def test_a_garbled_greeting_is_exit_9(fake_qemu, tmp_path, greeting, shown):
    r, sent = run(fake_qemu, tmp_path, {"greeting": greeting})
    assert r.returncode == 9, r.stderr
    line = one_short_line(r.stderr)
    assert line.startswith(f"livedump: unix:{tmp_path}/qmp.sock: garbled greeting, not QMP: ")
    assert shown in line
    assert "stop" not in [m.get("execute") for m in sent]


@pytest.mark.parametrize("reply", [
    {"return": {"arch": "x" * 100_000}},
    {"return": {"arch": 64}},
    {"return": "x86_64"},
    {"raw": "x" * 100_000},
])
def test_a_garbled_query_target_is_exit_9_and_shown_short(fake_qemu, tmp_path, reply):
    r, sent = run(fake_qemu, tmp_path, {"replies": {"query-target": reply}})
    assert r.returncode == 9, r.stderr
    line = one_short_line(r.stderr)
    assert line.startswith(("livedump: unexpected reply to 'query-target': ",
                            f"livedump: unix:{tmp_path}/qmp.sock: garbled reply to "
                            "'query-target', not QMP: "))
    assert "stop" not in [m.get("execute") for m in sent]


@pytest.mark.parametrize("running", ["false", "true", 0, None])
def test_a_run_state_that_is_not_a_boolean_is_exit_9(fake_qemu, tmp_path, running):
    r, sent = run(fake_qemu, tmp_path, {"replies": {"query-status": {
        "return": {"status": "running", "running": running}}}})
    assert r.returncode == 9, r.stderr
    assert one_short_line(r.stderr) == (
        "livedump: unexpected reply to 'query-status': "
        f"{ {'status': 'running', 'running': running}!r}\n")
    assert "stop" not in [m.get("execute") for m in sent]


def test_a_garbled_reply_mid_session_is_exit_9(fake_qemu, tmp_path):
    r, sent = run(fake_qemu, tmp_path, {"replies": {"hmp:info mtree -f": {
        "raw": "<html>" + "x" * 100_000}}})
    assert r.returncode == 9, r.stderr
    assert one_short_line(r.stderr).startswith(
        f"livedump: unix:{tmp_path}/qmp.sock: garbled reply to 'info mtree -f', "
        "not QMP: b'<html>xxx")
    assert "stop" not in [m.get("execute") for m in sent]


@pytest.mark.parametrize("raw, shown", [
    ('{\r\n    "return": nonsense\r\n}', "b'{\\r\\n    \"return\": nonsense\\r\\n}\\r\\n'"),
    ("{\r\n" + f'    "{"x" * 1000}",\r\n' * 11_000, "b'{\\r\\n    \"xxxxxxxx"),
])
def test_a_garbled_pretty_reply_is_exit_9_on_one_line(fake_qemu, tmp_path, raw, shown):
    r, sent = run(fake_qemu, tmp_path, {"pretty": True, "replies": {"query-target": {
        "raw": raw}}})
    assert r.returncode == 9, r.stderr
    assert one_short_line(r.stderr).startswith(
        f"livedump: unix:{tmp_path}/qmp.sock: garbled reply to 'query-target', not QMP: "
        f"{shown}")
    assert "stop" not in [m.get("execute") for m in sent]


def test_a_long_reply_in_any_message_is_cut_short(fake_qemu, tmp_path):
    r, _ = run(fake_qemu, tmp_path, {"replies": {"hmp:gpa2hva 0x0": {
        "return": "No memory " + "y" * 100_000}}})
    assert r.returncode == 9, r.stderr
    assert one_short_line(r.stderr).startswith(
        "livedump: unexpected reply to 'gpa2hva': 'No memory yyyy")


AARCH64_CPU = "/machine/unattached/device[0]"
AARCH64 = {"query-target": {"return": {"arch": "aarch64"}},
           "query-cpus-fast": {"return": [{"qom-path": AARCH64_CPU, "cpu-index": 0,
                                           "thread-id": 1, "target": "aarch64"}]}}


@pytest.mark.parametrize("properties, identity", [
    # QEMU 7.2's cortex-a15 on qemu-system-aarch64: no "aarch64" property.
    ([{"name": "midr", "type": "uint64"}, {"name": "cfgend", "type": "bool"}], (1, 40)),
    ([{"name": "midr", "type": "uint64"}, {"name": "aarch64", "type": "bool"}], (2, 183)),
])
def test_no_pause_on_aarch64_takes_the_cpu_kind_from_its_model(fake_qemu, tmp_path, properties,
                                                               identity):
    replies = {**AARCH64, "qom-list": {"return": properties},
               "qom-get": {"return": True}}
    r, sent = run(fake_qemu, tmp_path, {"replies": replies}, "--no-pause")
    assert r.returncode == 0, r.stderr
    assert "stop" not in [m["execute"] for m in sent]
    header = (tmp_path / "out" / "x.vmcore").read_bytes()[:20]
    assert (header[4], int.from_bytes(header[18:20], "little")) == identity
    [listed] = [m for m in sent if m["execute"] == "qom-list"]
    assert listed["arguments"] == {"path": AARCH64_CPU}


def test_no_pause_on_aarch64_refuses_a_cpu_kind_it_cannot_tell(fake_qemu, tmp_path):
    """A monitor that does not say which kind of CPU it runs: no guess, one line."""
    r, sent = run(fake_qemu, tmp_path, {"replies": AARCH64}, "--no-pause")
    assert r.returncode == 2
    assert one_short_line(r.stderr).startswith(
        "livedump: cannot tell which kind of CPU QEMU target aarch64 runs without its "
        "registers (its CPU model did not say: ")
    assert "stop" not in [m["execute"] for m in sent]
