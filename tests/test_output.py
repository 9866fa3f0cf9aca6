"""Output safety: 0600 from the start, no clobbering, nothing left behind on failure."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from livedump.errors import DumpIOError, OutputExists, UsageError
from livedump.output import Output

ROOT = Path(__file__).resolve().parents[1]


def test_file_appears_only_when_committed_and_is_0600(tmp_path):
    path = tmp_path / "a.vmcore"
    old = os.umask(0)
    try:
        with Output(str(path)) as out:
            out.write(b"x" * 10)
            assert not path.exists()
            [temp] = list(tmp_path.iterdir())
            assert stat.S_IMODE(temp.stat().st_mode) == 0o600
            out.commit()
    finally:
        os.umask(old)
    assert path.read_bytes() == b"x" * 10
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["a.vmcore"]


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with Output(str(tmp_path / "a.vmcore")) as out:
            out.write(b"partial")
            raise RuntimeError("dump failed")
    assert os.listdir(tmp_path) == []


def test_existing_file_and_symlink_are_refused_without_force(tmp_path):
    (tmp_path / "f").write_text("keep")
    os.symlink("/nonexistent", tmp_path / "dangling")
    for name in ("f", "dangling"):
        with pytest.raises(OutputExists, match="--force"):
            Output(str(tmp_path / name))
    assert (tmp_path / "f").read_text() == "keep"


def test_force_replaces_a_symlink_without_following_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    os.symlink(target, tmp_path / "link")
    with Output(str(tmp_path / "link"), force=True) as out:
        out.write(b"new")
        out.commit()
    assert target.read_text() == "keep"
    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "link").read_bytes() == b"new"


def test_path_appearing_during_the_dump_is_not_clobbered(tmp_path):
    path = tmp_path / "a.vmcore"
    with Output(str(path)) as out:
        path.write_text("raced")
        with pytest.raises(OutputExists, match="appeared during the dump"):
            out.commit()
    assert path.read_text() == "raced"
    assert os.listdir(tmp_path) == ["a.vmcore"]


def test_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Output(str(tmp_path / "no" / "a.vmcore"))



def test_write_at_patches_and_extends_without_moving_the_stream(tmp_path):
    path = tmp_path / "a.vmcore"
    with Output(str(path)) as out:
        out.write(b"headXXXX")
        out.write_at(4, b"body")       # a patch inside what was streamed
        out.write_at(16, b"tail")      # past the end: the gap is a hole
        out.write(b"++")               # the stream goes on where it was
        out.commit()
    assert path.read_bytes() == b"headbody++" + bytes(6) + b"tail"


def test_write_at_is_refused_on_stdout(monkeypatch):
    monkeypatch.setattr(os, "isatty", lambda fd: False)  # as when stdout is a pipe
    with pytest.raises(DumpIOError, match="out of order"):
        Output("-").write_at(0, b"x")


def _run_with(redirections: str, *args: str) -> "subprocess.CompletedProcess[bytes]":
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {redirections}', "sh", sys.executable, "-m", "livedump", *args],
        capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("redirection, message", [
    (">&-", b"livedump: standard output is closed: "),
    ("1</dev/null", b"livedump: standard output is open for reading only: "),
])
def test_unusable_stdout_is_refused_before_the_vm_is_looked_at(redirection, message):
    # A PID that cannot be QEMU: reached, it would be another error.
    r = _run_with(redirection, "--pid", str(os.getpid()), "-")
    assert r.returncode == 2
    assert r.stderr.startswith(message) and r.stderr.count(b"\n") == 1


def test_closed_fds_become_dev_null():
    """Each closed one is /dev/null at its own number, with a Python stream on it; what is
    printed to a closed standard error goes nowhere (Python's None would send it to stdout)."""
    code = ("import os, sys; from livedump.output import guard_standard_fds; "
            "guard_standard_fds(); "
            "print('error', file=sys.stderr); "
            "print(*[os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 2)], "
            "sys.stdin.fileno(), sys.stderr.fileno(), os.get_inheritable(2))")
    r = subprocess.run(["sh", "-c", 'exec "$@" <&- 2>&-', "sh", sys.executable, "-c", code],
                       capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0
    assert r.stdout == b"/dev/null /dev/null 0 2 True\n"
