"""Output safety: 0600 from the start, no clobbering, nothing left behind on failure."""

import os
import stat

import pytest

from livedump.errors import DumpIOError, OutputExists, UsageError
from livedump.output import Output


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
