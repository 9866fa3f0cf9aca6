"""The guardian, with real processes: its rescue of a FIFO whose reader died
(libvirtd's open of it must not wait forever), what a new watcher is told,
the end of a stream that never ends, and a livedump stopped while it holds
the VM."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from livedump.vm.guardian import Told, drain, release_fifo


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
        [sys.executable, "-m", "livedump.vm.guardian", str(theirs.fileno()), str(pidfd), "30",
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


def test_a_new_watcher_is_told_what_the_old_one_was(tmp_path):
    said = Told()
    r, w = os.pipe()
    for message, fd in [(b'S[["migrate-set-capabilities", {"capabilities": []}]]', -1),
                        (b"Mlivedump-snapshot", r), (b"A", -1), (b"P", -1),
                        (b"F/run/x/notes", -1), (b"O/srv/.x.vmcore.0123abcd.partial", -1),
                        (b".", -1)]:
        said.take(message, fd)
    again = Told()
    for message, fd in said.replay():
        again.take(message, fd)
    assert again == said
    said.take(b"E")
    said.take(b"R")
    said.take(b"D")
    said.take(b"F")
    said.take(b"O")
    assert said == Told() and said.replay() == []
    os.close(r)
    os.close(w)


def test_drain_ends_at_the_migrations_end_without_end_of_file():
    """A write end no migration took never closes: the end of the migration says when."""
    r, w = os.pipe()
    os.write(w, b"x" * 1000)
    calls = []
    drain(r, lambda: calls.append(1) or True)
    assert calls == [1]
    assert select.select([r], [], [], 0)[0] == []  # What was there was read.
    os.close(r)
    os.close(w)


# A livedump stand-in: its guardian (ptrace flavour: nothing to resume) is told
# a partial file and that QEMU is held, then it stops itself.
STOPS_HOLDING = """
import os, signal, sys
from livedump.vm.guardian import Guardian
guardian = Guardian.over_ptrace(float(sys.argv[2]))
guardian.partial(sys.argv[1])
guardian.paused()
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_stopped_livedump_is_killed_and_its_file_removed(tmp_path):
    partial = tmp_path / ".x.vmcore.0123abcd.partial"
    partial.write_bytes(b"guest memory")
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", STOPS_HOLDING, str(partial), "0.5"],
                       stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert r.stderr == (b"livedump: made no progress for 0.5 s while it held the QEMU process "
                        b"(stopped, or its output not read); its guardian killed it (which let "
                        b"QEMU go) and removed " + bytes(partial) + b"\n")
    assert not partial.exists()


@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
def test_the_watchers_monitor_reads_compact_and_pretty_replies(pretty):
    """The guardian speaks QMP on the connection it inherited, which may be a
    pretty-printed monitor's (-qmp-pretty): its replies span lines."""
    from livedump.vm.guardian import _Monitor

    ours, qemu = socket.socketpair()
    with ours, qemu:
        monitor = _Monitor(ours.fileno())

        def answer() -> None:
            request = json.loads(qemu.recv(4096))
            event = {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}
            reply = {"return": {"status": "running", "running": True}, "id": request["id"]}
            for message in (event, reply):
                text = json.dumps(message, indent=4) if pretty else json.dumps(message)
                qemu.sendall(text.replace("\n", "\r\n").encode() + b"\r\n")

        threading.Thread(target=answer, daemon=True).start()
        assert monitor.execute("query-status") == {
            "return": {"status": "running", "running": True}, "id": "livedump-guardian-1"}
