"""A watcher that lets the VM go if livedump dies, or stalls, while it holds the VM.

A SIGKILL (or an out-of-memory kill) gives livedump no chance to let the
VM go, and a stopped livedump (SIGSTOP, Ctrl-Z) or one whose output is not
read holds it for as long as that lasts. So livedump starts this small
process first and keeps it told over a socket. If livedump dies, or while
it holds the VM sends no sign of progress for the stall timeout (then the
watcher kills it: SIGKILL is what lets a ptrace-frozen QEMU go when its
tracer is stopped), the watcher does what livedump would have done:

- resumes a guest livedump paused: ``cont`` on the QMP connection it
  inherited (which stays open as long as the watcher holds it, so QEMU
  never even sees livedump go), or libvirt's resume for a libvirt domain
  (QEMU frozen under ptrace is let go by the kernel at its tracer's death);
- reads the stream of a ``--live`` snapshot to its end and drops it: once
  the snapshot is started it is never cancelled, nor its writes made to
  fail, as QEMU (7.2) lifts the write protection of guest RAM only from a
  snapshot that completes; a write end that QEMU holds by name, with no
  snapshot started, is closed (``closefd``), else no end would ever come;
- puts back QEMU's migration settings that ``--live`` changed, once the
  snapshot has ended;
- lets through libvirtd's open of a FIFO given to libvirt's dump (it would
  wait for a reader forever, holding the domain);
- removes the partial vmcore file.

livedump, for its part, watches the watcher: if it dies, livedump starts a
new one and tells it everything again (:class:`Guardian`).

The socket carries one message a packet (SOCK_SEQPACKET): ``P`` / ``R``
(livedump holds the guest paused, or QEMU frozen / no longer), ``S`` and a
JSON list of ``[command, arguments]`` (what puts the settings back) / ``D``
(they are back), ``F`` and a FIFO's path (``F`` alone: no FIFO any more),
``O`` and the partial file's path (likewise), ``M`` and the name QEMU
knows the stream's write end by, with the stream's read end attached /
``A`` (the snapshot is started: livedump must read it, or the guest may
block) / ``E`` (read to its end, the snapshot over), ``.`` (progress), and
``X`` (livedump lets go on purpose: do what is still due now, and end).

    python -m livedump.vm.guardian CHANNEL_FD PIDFD STALL_SECONDS qmp MONITOR_FD
    python -m livedump.vm.guardian CHANNEL_FD PIDFD STALL_SECONDS libvirt URI UUID
    python -m livedump.vm.guardian CHANNEL_FD PIDFD STALL_SECONDS ptrace
"""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from livedump import signals
from livedump.errors import GuardianLost
from livedump.qmp.framing import Framer

PAUSED = b"P"
RESUMED = b"R"
SETTINGS = b"S"
RESTORED = b"D"
FIFO = b"F"
PARTIAL = b"O"
STREAM = b"M"
STREAMING = b"A"
STREAM_DONE = b"E"
PROGRESS = b"."
LETTING_GO = b"X"

STALL_TIMEOUT = 30.0
_REPLY_TIMEOUT = 10.0
_MAX_MESSAGE = 1 << 24  # bytes of one QMP message at most, as qemu.qmp reads them
_MIGRATION_END_TIMEOUT = 30.0
_DEATH_TIMEOUT = 10.0  # for a killed livedump to be gone (one in a disk wait takes a while)
_DRAIN_POLL = 0.2
_DRAIN_BUFFER = 1 << 20
_MESSAGE_MAX = 1 << 16
_REPLACEMENTS = 8  # watchers started after the first died: past that, something kills them
# Migration states in which no migration is under way (``query-migrate``).
MIGRATION_IDLE = frozenset({"none", "completed", "failed", "cancelled"})


@dataclass
class Told:
    """What the watcher knows: all it needs to let the VM go, and to be told again."""

    paused: bool = False
    settings: list[tuple[str, dict[str, object]]] | None = None
    fifo: str = ""
    partial: str = ""
    stream: int = -1  # the snapshot stream's read end
    stream_name: str = ""  # what QEMU calls the write end until a migration takes it
    streaming: bool = False

    def take(self, message: bytes, fd: int = -1) -> None:
        """Learn what ``message`` (with ``fd``, for ``M``) says."""
        kind, body = message[:1], message[1:]
        if kind in (PAUSED, RESUMED):
            self.paused = kind == PAUSED
        elif kind == SETTINGS:
            self.settings = json.loads(body)
        elif kind == RESTORED:
            self.settings = None
        elif kind == FIFO:
            self.fifo = os.fsdecode(body)
        elif kind == PARTIAL:
            self.partial = os.fsdecode(body)
        elif kind == STREAM:
            self.stream, self.stream_name = fd, body.decode()
        elif kind == STREAMING:
            self.streaming = True
        elif kind == STREAM_DONE:
            self.stream, self.stream_name, self.streaming = -1, "", False

    @property
    def holding(self) -> bool:
        """Whether livedump holds the VM: paused, or with a snapshot only it reads."""
        return self.paused or self.streaming

    def replay(self) -> list[tuple[bytes, int]]:
        """The messages that tell a new watcher all this: (message, fd or -1)."""
        said: list[tuple[bytes, int]] = []
        if self.settings is not None:
            said.append((SETTINGS + json.dumps(self.settings).encode(), -1))
        if self.stream >= 0:
            said.append((STREAM + self.stream_name.encode(), self.stream))
        if self.streaming:
            said.append((STREAMING, -1))
        if self.paused:
            said.append((PAUSED, -1))
        if self.fifo:
            said.append((FIFO + os.fsencode(self.fifo), -1))
        if self.partial:
            said.append((PARTIAL + os.fsencode(self.partial), -1))
        return said


class Guardian:
    """livedump's side: start the watcher, keep it told, and start a new one
    (told everything again) should it die."""

    def __init__(self, how: list[str], pass_fds: tuple[int, ...] = (),
                 stall: float = STALL_TIMEOUT) -> None:
        self._how = how
        self._pass_fds = pass_fds
        self._stall = stall
        self._beat_every = min(0.5, stall / 10)
        self._last_beat = 0.0
        self._told = Told()
        self._stream_copy = -1  # ours, to hand to a new watcher: the caller closes its own
        self._lock = threading.Lock()  # over the socket and what was told
        self._closing = False
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd = os.pidfd_open(os.getpid())  # so a watcher can kill this process, and only it
        self._replaced = 0
        try:
            try:
                self._start()
            except OSError as e:
                raise GuardianLost(f"could not start its guardian process: {e.strerror}"
                                   ) from None
            with signals.deferred():  # Signals are for the main thread, as ever.
                threading.Thread(target=self._watch, name="livedump-guardian-watch",
                                 daemon=True).start()
        except BaseException:
            self._end()
            raise

    @classmethod
    def over_qmp(cls, monitor_fd: int, stall: float = STALL_TIMEOUT) -> "Guardian":
        """A guardian that sends ``cont`` on the QMP connection ``monitor_fd``."""
        return cls(["qmp", str(monitor_fd)], (monitor_fd,), stall)

    @classmethod
    def over_libvirt(cls, uri: str, uuid: str, stall: float = STALL_TIMEOUT) -> "Guardian":
        """A guardian that has libvirt at ``uri`` resume the domain ``uuid``."""
        return cls(["libvirt", uri, uuid], (), stall)

    @classmethod
    def over_ptrace(cls, stall: float = STALL_TIMEOUT) -> "Guardian":
        """A guardian for QEMU frozen under ptrace: livedump's death lets it go."""
        return cls(["ptrace"], (), stall)

    def paused(self) -> None:
        """Said before the guest is paused (or QEMU frozen): from here on, a death
        means resume, and a stall is watched for."""
        self._say(PAUSED)

    def resumed(self) -> None:
        self._say(RESUMED)

    def restore_on_death(self, commands: list[tuple[str, dict[str, object]]]) -> None:
        """Said before QEMU's migration settings are changed: how to put them back."""
        self._say(SETTINGS + json.dumps(commands).encode())

    def restored(self) -> None:
        self._say(RESTORED)

    def fifo(self, path: str | None) -> None:
        """Said while a dump may open the FIFO ``path`` (None: no longer)."""
        self._say(FIFO + os.fsencode(path or ""))

    def partial(self, path: str | None) -> None:
        """Said once the partial vmcore file ``path`` exists (None: it is gone)."""
        self._say(PARTIAL + os.fsencode(path or ""))

    def stream(self, fd: int, name: str) -> None:
        """Said before QEMU is given the write end of the pipe whose read end is
        ``fd``, as ``name``: a copy of ``fd`` goes to the watcher."""
        with self._locked():
            self._stream_copy = os.dup(fd)
        self._say(STREAM + name.encode(), self._stream_copy)

    def streaming(self) -> None:
        """Said before the snapshot is started: from here on, it must be read to its end."""
        self._say(STREAMING)

    def stream_done(self) -> None:
        """Said once the stream was read to its end and the snapshot is over
        (or none was started and QEMU holds no write end)."""
        self._say(STREAM_DONE)
        with self._locked():
            if self._stream_copy >= 0:
                os.close(self._stream_copy)
                self._stream_copy = -1

    def beat(self) -> None:
        """Said on progress: a watcher that hears none for the stall timeout
        while the VM is held kills livedump. Cheap to call often."""
        now = time.monotonic()
        if now - self._last_beat >= self._beat_every:
            self._last_beat = now
            self._say(PROGRESS, block=False)

    def _say(self, message: bytes, fd: int = -1, block: bool = True) -> None:
        with self._locked():
            if self._closing:
                return  # (Not after a rescue: the watcher is gone.)
            self._told.take(message, fd)
            self._send(message, fd, block)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, taken with signals held: one raised between taking it and the
        block's start would leave it taken, and the next word would wait for ever."""
        with signals.deferred(), self._lock:
            yield

    def _send(self, message: bytes, fd: int, block: bool) -> None:
        assert self._sock is not None
        try:
            if fd >= 0:
                socket.send_fds(self._sock, [message], [fd])
            else:
                self._sock.send(message, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass  # A busy watcher: a heartbeat more or less makes no difference.
        except OSError:
            self._replace()  # It died: a new one is told all, this message included.

    def _start(self) -> None:
        """Start a watcher, told everything so far before it exists: a livedump
        killed the moment the watcher is there has told it all already."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for message, fd in self._told.replay():
                if fd >= 0:
                    socket.send_fds(ours, [message], [fd])
                else:
                    ours.send(message)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "livedump.vm.guardian", str(theirs.fileno()),
                 str(self._pidfd), f"{self._stall:g}", *self._how],
                pass_fds=(theirs.fileno(), self._pidfd, *self._pass_fds),
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours

    def _replace(self) -> None:
        """With the lock held: the watcher died; start a new one, or (if none can be
        started) have the main thread stop, resuming the guest on its way out."""
        if self._process is not None:
            self._process.poll()  # Reaped: no zombie.
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._replaced += 1
        try:
            if self._replaced > _REPLACEMENTS:
                raise OSError(0, f"{_REPLACEMENTS} died already")
            self._start()
        except OSError as e:
            self._closing = True  # Nothing to tell any more.
            signals.raise_in_main(GuardianLost(
                f"its guardian process died, and no new one could be started: {e.strerror}"))

    def _watch(self) -> None:
        """Wait on the watcher (which never writes: its socket turns readable
        when it is gone), and replace it as soon as it dies."""
        while True:
            with self._lock:
                sock = self._sock
            if sock is None:
                return
            try:
                select.select([sock], [], [])
            except (OSError, ValueError):
                pass  # Closed under us: see below.
            with self._lock:
                if self._closing:
                    return
                if sock is self._sock:
                    self._replace()

    def rescue(self) -> bool:
        """Let the watcher do now what is due (resume the guest, on its own
        connection); whether it worked."""
        return self.close() == 0

    def close(self) -> int:
        """End the watcher, once it has done what is still due (resume the guest
        if told "paused", read a snapshot to its end, put the settings back...);
        its status."""
        with self._locked():
            if self._closing:
                return 0 if self._process is None else self._process.wait()
            self._closing = True
            if self._sock is not None:
                try:
                    self._sock.send(LETTING_GO)
                except OSError:
                    pass  # It died: what is due stays undone, as livedump lives and reports.
        try:
            return self._process.wait() if self._process is not None else 1
        finally:
            self._end()

    def _end(self) -> None:
        with self._locked():
            self._closing = True
            for fd in (self._stream_copy, self._pidfd):
                if fd >= 0:
                    os.close(fd)
            self._stream_copy = self._pidfd = -1
            if self._sock is not None:
                self._sock.close()  # Wakes the thread that waits on the watcher.
                self._sock = None


def drain(fd: int, ended: Callable[[], bool], progress: Callable[[], None] | None = None
          ) -> None:
    """Read a migration stream to its end, dropping what comes: until end of
    file, or until ``ended()`` says the migration is over and nothing came
    meanwhile (a write end that no migration took never closes)."""
    buffer = bytearray(_DRAIN_BUFFER)
    while True:
        if select.select([fd], [], [], _DRAIN_POLL)[0]:
            if not os.readv(fd, [buffer]):
                return
            if progress:
                progress()
        elif ended():
            return


# The watcher itself.

def _watch(channel: socket.socket, pidfd: int, stall: float, how: list[str]) -> int:
    told = Told()
    died = stalled = False
    heard = time.monotonic()
    while True:
        if stalled:  # Killed: what it said last, up to the end of the socket.
            wait: float | None = _DEATH_TIMEOUT
        else:
            wait = max(0.0, heard + stall - time.monotonic()) if told.holding else None
        if not select.select([channel], [], [], wait)[0]:
            if stalled:
                break
            stalled = True
            _kill(pidfd)
            continue
        message, fd = _receive(channel)
        if not message:
            died = True
            break
        heard = time.monotonic()
        if message == LETTING_GO:
            break
        if message[:1] in (STREAM, STREAM_DONE) and told.stream >= 0:
            os.close(told.stream)
        told.take(message, fd)
    done, ok = _let_go(told, how)
    if stalled:
        frozen = how[0] == "ptrace" and told.paused
        done.insert(0, "killed it (which let QEMU go)" if frozen else "killed it")
        print(f"livedump: made no progress for {stall:g} s while it held the "
              f"{'QEMU process' if how[0] == 'ptrace' else 'guest'} (stopped, or its output "
              f"not read); its guardian {_listed(done)}", file=sys.stderr)
    elif died and done:
        print(f"livedump: died while {_what(told, how)}; its guardian {_listed(done)}",
              file=sys.stderr)
    return 0 if ok else 1


def _receive(channel: socket.socket) -> tuple[bytes, int]:
    """The next message and the descriptor it carries (-1 if none); b"" at the end."""
    try:
        message, fds, _, _ = socket.recv_fds(channel, _MESSAGE_MAX, 1)
    except OSError:
        return b"", -1
    return message, fds[0] if fds else -1


def _what(told: Told, how: list[str]) -> str:
    if told.paused:
        return "QEMU was frozen" if how[0] == "ptrace" else "the guest was paused"
    if told.stream >= 0:
        return "reading QEMU's snapshot of the guest"
    if told.settings is not None:
        return "QEMU's migration settings were changed"
    return "writing the vmcore"


def _listed(done: list[str]) -> str:
    return done[0] if len(done) == 1 else ", ".join(done[:-1]) + " and " + done[-1]


def _kill(pidfd: int) -> None:
    """SIGKILL livedump, and wait until it is gone (and so its hold on QEMU)."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    select.select([pidfd], [], [], _DEATH_TIMEOUT)


def _let_go(told: Told, how: list[str]) -> tuple[list[str], bool]:
    """Do what livedump left undone; what was done, and whether all of it worked."""
    done: list[str] = []
    ok = True
    if told.fifo:
        release_fifo(told.fifo)
    if how[0] == "libvirt":
        if told.paused:
            from livedump.libvirt.domain import resume_if_paused

            ok = resume_if_paused(*how[1:3])
            done += ["resumed the guest"] if ok else []
    elif how[0] == "qmp":
        ok = _let_go_qmp(_Monitor(int(how[1])), told, done)
    # (QEMU frozen under ptrace: the kernel let it go at its tracer's death.)
    if told.partial:
        try:
            os.unlink(told.partial)
            done.append(f"removed {told.partial}")
        except FileNotFoundError:
            pass
        except OSError:
            ok = False
    return done, ok


def _let_go_qmp(monitor: "_Monitor", told: Told, done: list[str]) -> bool:
    try:
        # Once a snapshot may have started, the guest is resumed only after it has
        # ended: QEMU shows the guest paused as soon as its snapshot begins to stop
        # it, and a 'cont' before its vCPUs are all stopped leaves QEMU's snapshot
        # waiting for them for ever (its stream never comes).
        if told.paused and not told.streaming and not _resume(monitor, done):
            return False
        if told.stream >= 0:
            if told.stream_name:  # Fails harmlessly if a migration took it.
                monitor.execute("closefd", {"fdname": told.stream_name})
            drain(told.stream, lambda: monitor.migration_ended(0))
            os.close(told.stream)
            if told.streaming:
                done.append("read the snapshot to its end")
        if told.paused and told.streaming and not _resume(monitor, done):
            return False
        if told.settings is not None:
            if not monitor.migration_ended(_MIGRATION_END_TIMEOUT):
                return False
            if not all(monitor.execute(command, arguments) is not None
                       for command, arguments in told.settings):
                return False
            done.append("put QEMU's migration settings back")
    except OSError:
        return False  # The monitor is gone (and QEMU with it, most likely).
    return True


def _resume(monitor: "_Monitor", done: list[str]) -> bool:
    """Resume the guest unless it runs (livedump's own 'cont', or QEMU's at the
    end of its snapshot's start, went through); whether that worked."""
    reply = monitor.execute("query-status")
    if reply is None:
        return False
    status = reply.get("return")
    if isinstance(status, dict) and status.get("running"):
        return True
    if monitor.execute("cont") is None:
        return False
    done.append("resumed the guest")
    return True


def release_fifo(path: str, fd: int = -1) -> None:
    """Remove the FIFO ``path`` (and the directory made for it), and close its
    reader ``fd``, opened here if not given: a writer waiting in open() is let
    through, and fails at its first write. The name goes first, so that no
    open can start once no reader is left."""
    if fd < 0:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass  # Gone already: no open can be waiting on it.
    # Each on its own: a file never made (or gone) must not leave its directory.
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
    if fd >= 0:
        os.close(fd)


class _Monitor:
    """QMP on the inherited connection: one command at a time, its reply picked
    out of whatever else QEMU sends (events, replies meant for livedump)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self._count = 0
        self._framer = Framer(_MAX_MESSAGE)  # a pretty monitor's message spans lines

    def execute(self, command: str, arguments: dict[str, object] | None = None
                ) -> dict[str, object] | None:
        self._count += 1
        tag = f"livedump-guardian-{self._count}"
        message: dict[str, object] = {"execute": command, "id": tag}
        if arguments:
            message["arguments"] = arguments
        os.write(self.fd, json.dumps(message).encode())
        deadline = time.monotonic() + _REPLY_TIMEOUT
        while time.monotonic() < deadline:
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                try:
                    whole = self._framer.add(line + b"\n")
                    if whole is None:
                        continue  # More of a pretty-printed message to come.
                    reply = json.loads(whole)
                except ValueError:  # (TooLong too: that message is dropped.)
                    continue
                if isinstance(reply, dict) and reply.get("id") == tag:
                    return reply
            ready, _, _ = select.select([self.fd], [], [], deadline - time.monotonic())
            if not ready or not (data := os.read(self.fd, 65536)):
                break
            self._buffer += data
        return None

    def migration_ended(self, timeout: float) -> bool:
        """Whether no migration is under way, waiting up to ``timeout`` for it to end
        (one whose state cannot be learnt counts as ended: nothing more can be done)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.execute("query-migrate")
            status = reply.get("return", {}) if reply is not None else None
            if not isinstance(status, dict) or status.get("status", "none") in MIGRATION_IDLE:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    # Signals held by the thread that started us stay held across exec: not here.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    channel = socket.socket(fileno=int(argv[0]))
    os.set_inheritable(channel.fileno(), False)
    pidfd = int(argv[1])
    os.set_inheritable(pidfd, False)
    return _watch(channel, pidfd, float(argv[2]), argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
