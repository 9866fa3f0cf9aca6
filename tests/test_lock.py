"""The dump lock's holder, found in /proc/locks, and told apart from livedump."""

import fcntl
import os
import subprocess
import sys

from livedump.vm.lock import _holder, _try_lock, is_livedump


def test_the_holder_of_a_flock_is_found_by_inode(tmp_path):
    path = tmp_path / "f"
    path.write_text("")
    other = tmp_path / "g"
    other.write_text("")
    code = ("import fcntl, sys; f = open(sys.argv[1]); "
            "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        fd = os.open(path, os.O_RDONLY)
        free = os.open(other, os.O_RDONLY)
        try:
            assert not _try_lock(fd)
            assert _holder(fd) == holder.pid
            assert _holder(free) is None
        finally:
            os.close(fd)
            os.close(free)
    finally:
        holder.communicate(timeout=10)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _try_lock(fd)
        assert _holder(fd) == os.getpid()
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_is_livedump():
    assert is_livedump(["/usr/bin/python3", "/opt/venv/bin/livedump", "--pid", "1", "x"])
    assert is_livedump(["/usr/bin/python3", "-m", "livedump", "--pid", "1", "x"])
    assert is_livedump(["livedump", "x"])
    assert not is_livedump(["/usr/bin/python3", "-m", "livedump.vm.guardian", "1"])
    assert not is_livedump(["flock", "/proc/1/mem", "sleep", "9"])
    assert not is_livedump([])
