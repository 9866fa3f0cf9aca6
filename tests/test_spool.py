"""The spool of ``--live --format kdump``: a file no name leads to, read back as memory."""

import errno
import os
import stat

import pytest

from livedump.errors import DumpIOError
from livedump.transfer import spool as spool_module
from livedump.transfer.memory import ABSENT, DATA, Buffer
from livedump.transfer.spool import Spool

PAGE = 4096


def test_no_name_leads_to_it_and_it_is_0600(tmp_path):
    with Spool(str(tmp_path)) as s:
        s.write_at(PAGE, b"x" * PAGE)
        assert os.listdir(tmp_path) == []
        assert stat.S_IMODE(os.fstat(s._fd).st_mode) == 0o600
        assert s.mode == 0o600
    assert os.listdir(tmp_path) == []


def test_pages_never_written_are_holes_read_as_zeros(tmp_path):
    with Spool(str(tmp_path)) as s:
        s.write_at(2 * PAGE, b"a" * PAGE)
        s.extend(8 * PAGE)
        s.seal()
        runs = list(s.extents(0, 8 * PAGE))
        # Where the filesystem tells holes apart (tmpfs, ext4, xfs, btrfs do).
        assert (2 * PAGE, PAGE, DATA) in runs
        assert sum(n for _, n, _ in runs) == 8 * PAGE
        assert all(kind == ABSENT for at, _, kind in runs if at != 2 * PAGE)
        buf = Buffer(8 * PAGE)
        data = bytes(s.read(buf, 8 * PAGE, 0))
        assert data == bytes(2 * PAGE) + b"a" * PAGE + bytes(5 * PAGE)
        assert s.allocated >= PAGE


def test_reading_past_its_end_is_an_error(tmp_path):
    with Spool(str(tmp_path)) as s:
        s.write_at(0, b"a" * PAGE)
        s.seal()
        with pytest.raises(DumpIOError, match="ends at 0x1000"):
            s.read(Buffer(2 * PAGE), 2 * PAGE, 0)


def test_without_o_tmpfile_the_name_goes_at_once(tmp_path, monkeypatch):
    real_open = os.open

    def no_tmpfile(path, flags, mode=0o777, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, mode, **kw)
    monkeypatch.setattr(spool_module.os, "open", no_tmpfile)
    with Spool(str(tmp_path)) as s:
        assert os.listdir(tmp_path) == []
        s.write_at(0, b"b" * 10)
        assert s.read_at(0, 10) == b"b" * 10
