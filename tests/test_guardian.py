"""The guardian's rescue of a FIFO whose reader died: libvirtd's open of it must
not wait forever (real FIFOs, a real blocked open, the real watcher process)."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from livedump.guardian import release_fifo


class BlockedOpen(threading.Thread):
    """A writer opening ``path`` as libvirtd does: blocked until a reader comes."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        except OSError as e:
            self.error = e
            return
        try:
            for _ in range(64):  # more than a pipe holds, as a dump is
                os.write(fd, bytes(1 << 16))
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)


def _fifo(tmp_path) -> str:
    directory = tmp_path / "livedump-x"
    directory.mkdir()
    path = str(directory / "notes")
    os.mkfifo(path, 0o600)
    return path


def _started(path: str) -> BlockedOpen:
    opener = BlockedOpen(path)
    opener.start()
    time.sleep(0.2)
    assert opener.is_alive()  # waiting in open(), as no reader has come
    return opener


def test_a_writer_waiting_for_a_dead_reader_is_let_through(tmp_path):
    path = _fifo(tmp_path)
    opener = _started(path)
    release_fifo(path)
    opener.join(5)
    assert not opener.is_alive()
    assert isinstance(opener.error, BrokenPipeError)  # its dump fails at the first write
    assert not os.path.exists(os.path.dirname(path))


def test_once_released_no_open_can_wait(tmp_path):
    path = _fifo(tmp_path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    release_fifo(path, reader)  # as livedump does with its own reader
    with pytest.raises(FileNotFoundError):
        os.open(path, os.O_WRONLY)


@pytest.mark.parametrize("paused", [True, False])
def test_the_watcher_releases_the_fifo_when_livedump_dies(tmp_path, paused):
    # The watcher over QMP, told "paused" or not, then a FIFO; its livedump
    # "dies" (the socket ends). With no monitor to resume through, a paused
    # guest cannot be resumed (status 1), but the FIFO is let go either way.
    path = _fifo(tmp_path)
    opener = _started(path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor, qemu_side = socket.socketpair()
    pidfd = os.pidfd_open(os.getpid())
    watcher = subprocess.Popen(
        [sys.executable, "-m", "livedump.guardian", str(theirs.fileno()), str(pidfd), "30",
         "qmp", str(monitor.fileno())], pass_fds=(theirs.fileno(), pidfd, monitor.fileno()))
    theirs.close()
    os.close(pidfd)
    if paused:
        ours.send(b"P")
    ours.send(b"F" + os.fsencode(path))
    monitor.close()
    qemu_side.close()  # No QEMU behind it.
    ours.close()
    assert watcher.wait(30) == (1 if paused else 0)
    opener.join(5)
    assert not opener.is_alive() and isinstance(opener.error, BrokenPipeError)
    assert not os.path.exists(path)
