"""Output safety: 0600 from the start, no clobbering, nothing left behind on failure."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from livedump.errors import DumpIOError, OutputExists, UsageError
from livedump.transfer import output
from livedump.transfer.output import Output, Placement

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
    code = ("import os, sys; from livedump.transfer.output import guard_standard_fds; "
            "guard_standard_fds(); "
            "print('error', file=sys.stderr); "
            "print(*[os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 2)], "
            "sys.stdin.fileno(), sys.stderr.fileno(), os.get_inheritable(2))")
    r = subprocess.run(["sh", "-c", 'exec "$@" <&- 2>&-', "sh", sys.executable, "-c", code],
                       capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0
    assert r.stdout == b"/dev/null /dev/null 0 2 True\n"


def _special_files(tmp_path):
    """A FIFO, a directory and (as root) a copy of /dev/null, each holding a marker
    that shows whether it was touched."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "inside").write_text("keep")
    made = [(fifo, "a FIFO"), (directory, "a directory")]
    if os.geteuid() == 0:
        device = tmp_path / "null"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made.append((device, "a character device"))
    return made


@pytest.mark.parametrize("force", [False, True])
def test_only_regular_files_and_symlinks_are_replaced(tmp_path, force):
    for path, kind in _special_files(tmp_path):
        before = os.lstat(path)
        with pytest.raises(OutputExists) as e:
            Output(str(path), force=force)
        assert str(e.value) == (f"{path} is {kind}: livedump replaces only regular files "
                                "and symlinks, even with --force")
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_rdev) == (
            before.st_ino, before.st_mode, before.st_rdev)
    assert (tmp_path / "dir" / "inside").read_text() == "keep"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_a_path_that_becomes_a_fifo_during_the_dump_is_left_alone(tmp_path):
    path = tmp_path / "a.vmcore"
    path.write_text("old")
    with Output(str(path), force=True) as out:
        out.write(b"new")
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(OutputExists, match="became a FIFO during the dump"):
            out.commit()
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert os.listdir(tmp_path) == ["a.vmcore"]


@pytest.mark.parametrize("placement", [Placement.RENAME, Placement.LINK, Placement.CLAIM])
def test_each_placement_puts_the_file_in_place_and_never_clobbers(tmp_path, monkeypatch,
                                                                   placement):
    """RENAME where the filesystem has RENAME_NOREPLACE (here); LINK where the C library
    has no renameat2; CLAIM where there are no links either (FUSE vfat and exfat)."""
    if placement is not Placement.RENAME:
        monkeypatch.setattr(output, "_renameat2", None)
    if placement is Placement.CLAIM:
        def no_links(*args):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "a.vmcore"
    with Output(str(path)) as out:
        assert out.placement is placement
        out.write(b"dump")
        out.commit()
    assert path.read_bytes() == b"dump"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["a.vmcore"]
    other = tmp_path / "b.vmcore"
    with Output(str(other)) as out:
        out.write(b"dump")
        other.write_text("raced")
        with pytest.raises(OutputExists, match="appeared during the dump"):
            out.commit()
    assert other.read_text() == "raced"
    assert sorted(os.listdir(tmp_path)) == ["a.vmcore", "b.vmcore"]


def test_a_touched_claim_is_left_to_whoever_touched_it(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_text("dump")
    real_lstat = os.lstat

    def someone_writes_first(path, *args, **kwargs):
        if str(path) == str(target):
            target.write_text("theirs")  # opened without O_EXCL: into the claim
        return real_lstat(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "lstat", someone_writes_first)
        assert not output._claim_and_rename(str(source), str(target))
    assert target.read_text() == "theirs"
    assert source.read_text() == "dump"
