"""Hold every thread of a process still with ptrace, for when no monitor can pause the VM.

Each thread is attached with PTRACE_SEIZE and stopped with PTRACE_INTERRUPT,
which, unlike PTRACE_ATTACH, sends no SIGSTOP: the process's signal state is
untouched. Letting go is PTRACE_DETACH, after which the kernel puts back
whatever job-control state the process has (a process that was stopped by
SIGSTOP is stopped again), so livedump never sends SIGSTOP or SIGCONT itself.

ptrace answers only the thread that attached: enter and leave :func:`frozen`
on the same thread.
"""

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator

from ptrace import PtraceError
from ptrace.binding import func

from livedump import proc, signals
from livedump.errors import FreezeError, PermissionDenied, ProcessNotFound
from livedump.vm.pause import Pause

# Linux's __WALL, which Python's os does not export: wait for threads, not only processes.
_WALL = func.THREAD_TRACE_FLAGS
_PTRACE_EVENT_STOP = 128
# How long letting go may wait for a thread to reach its stop or to be reaped.
_GRACE = 2.0
# How long it goes on waiting while a seized thread lives but has not stopped yet
# (asleep in the kernel, or not scheduled on a loaded host): such a thread is not
# held by us, and stops, to be let go at once, as soon as it runs.
_WAKE_LIMIT = 60.0


class _Ptrace:
    """The ptrace requests freezing needs, with failures as OSError.

    python-ptrace's binding names no PTRACE_SEIZE or PTRACE_INTERRUPT, so
    their numbers go through its generic call. An OSError's subclass tells
    a thread that is gone (ProcessLookupError) from one we may not trace
    (PermissionError).
    """

    SEIZE = 0x4206
    INTERRUPT = 0x4207

    def seize(self, tid: int) -> None:
        self._call(self.SEIZE, tid)

    def interrupt(self, tid: int) -> None:
        self._call(self.INTERRUPT, tid)

    def detach(self, tid: int, signum: int) -> None:
        self._call(func.PTRACE_DETACH, tid, signum)

    @staticmethod
    def _call(request: int, tid: int, data: int = 0) -> None:
        try:
            func.ptrace(request, tid, 0, data)
        except PtraceError as e:
            raise OSError(e.errno, os.strerror(e.errno)) from None


class _Threads:
    """The threads of one process that we have seized, and what to hand back to each."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tracer = threading.get_native_id()
        self.ptrace = _Ptrace()
        self.running: set[int] = set()  # Seized and interrupted; stop not seen yet.
        self.stopped: dict[int, int] = {}  # In a ptrace-stop: the signal to pass on at detach.

    def freeze(self, timeout: float) -> None:
        """Stop every thread, including those started or ended meanwhile.

        A thread can only start another while it runs, so once every thread
        listed is stopped and listing again finds no new one, none is left.
        """
        deadline = time.monotonic() + timeout
        while new := self._unseized():
            for tid in new:
                self._seize(tid)
            self._wait(deadline)
            if self.running:
                raise FreezeError(
                    f"could not stop {_describe(self.pid, self.running)} of PID "
                    f"{self.pid} within {timeout:g} s"
                )
        if not self.stopped:
            raise ProcessNotFound(f"process {self.pid} has exited")

    def release(self) -> None:
        """Detach every seized thread, then check that none is left held."""
        started = time.monotonic()
        deadline = started + _GRACE
        while True:
            for tid, signum in list(self.stopped.items()):
                del self.stopped[tid]
                try:
                    self.ptrace.detach(tid, signum)
                except ProcessLookupError:
                    self.running.add(tid)  # Killed while stopped: ours to reap.
            if not self.running:
                break
            now = time.monotonic()
            if now > deadline:
                if now - started > _WAKE_LIMIT or not any(
                        _alive(self.pid, t) for t in self.running):
                    break
                deadline = now + _GRACE
            self._wait(deadline)  # Seized threads must reach a stop to be detached.
        self._verify()

    def _unseized(self) -> list[int]:
        return [
            t for t in _tasks(self.pid)
            if t not in self.running and t not in self.stopped and _alive(self.pid, t)
        ]

    def _seize(self, tid: int) -> None:
        try:
            self.ptrace.seize(tid)
        except ProcessLookupError:
            return  # Exited since it was listed.
        except PermissionError:
            if not _alive(self.pid, tid):
                return  # Exiting: ptrace refuses a thread that is already a zombie.
            raise PermissionDenied(_why_not(self.pid, tid)) from None
        self.running.add(tid)
        with contextlib.suppress(ProcessLookupError):  # Exited: waiting will reap it.
            self.ptrace.interrupt(tid)

    def _wait(self, deadline: float) -> None:
        """Collect stops and exits until every seized thread is accounted for, or the deadline."""
        pause = 1e-4
        while self.running:
            for tid in list(self.running):
                self._collect(tid)
            if not self.running or time.monotonic() > deadline:
                return
            time.sleep(pause)
            pause = min(2 * pause, 0.01)

    def _collect(self, tid: int) -> None:
        try:
            got, status = os.waitpid(tid, os.WNOHANG | _WALL)
        except ChildProcessError:
            got, status = tid, 0  # Reaped already: no longer ours.
        if not got:
            return
        self.running.discard(tid)
        if os.WIFSTOPPED(status):
            # PTRACE_EVENT_STOP is our interrupt or a group-stop; any other
            # stop is the delivery of a signal, which must not be lost.
            event_stop = status >> 16 == _PTRACE_EVENT_STOP
            self.stopped[tid] = 0 if event_stop else os.WSTOPSIG(status)

    def _verify(self) -> None:
        """Fail if a thread is still traced by us, or stays in a tracing stop."""
        deadline = time.monotonic() + _GRACE
        while held := [t for t in _tasks(self.pid, missing_ok=True) if self._held(t)]:
            if time.monotonic() > deadline:
                raise FreezeError(
                    f"{_describe(self.pid, held)} of PID {self.pid} could not be "
                    "let go; livedump's exit will release them"
                )
            time.sleep(0.001)  # Detached threads leave the tracing stop once scheduled.

    def _held(self, tid: int) -> bool:
        status = _status(self.pid, tid)
        tracer = int(status.get("TracerPid", "0"))
        return tracer == self.tracer or (tracer == 0 and status.get("State", "").startswith("t"))


@contextlib.contextmanager
def frozen(pid: int, timeout: float = 5.0) -> Iterator[Pause]:
    """Keep every thread of process ``pid`` in a ptrace-stop for the duration of the block.

    A process that was stopped (SIGSTOP) stays stopped afterwards; one that
    ran runs again. ``timeout`` bounds the wait for threads to stop: one in
    uninterruptible sleep stops only when it wakes.
    """
    pause = Pause(was_running=_state(pid) != "T")
    threads = _Threads(pid)
    try:
        # A signal that arrives meanwhile is raised when the mask is lifted,
        # inside this try: every seized thread is let go all the same.
        with signals.deferred():
            threads.freeze(timeout)
            pause.stopped_at = time.monotonic()
        yield pause
    finally:
        with signals.deferred():
            threads.release()
            pause.resumed_at = time.monotonic()


def _state(pid: int) -> str:
    fields = proc.stat_fields(pid)
    if fields is None:
        raise ProcessNotFound(f"no process with PID {pid}")
    return fields[0]


def _tasks(pid: int, missing_ok: bool = False) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        if missing_ok:
            return []
        raise ProcessNotFound(f"process {pid} has exited") from None


def _status(pid: int, tid: int) -> dict[str, str]:
    """Fields of /proc/PID/task/TID/status; none if the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            return dict(line.rstrip("\n").partition(":\t")[::2] for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _alive(pid: int, tid: int) -> bool:
    state = _status(pid, tid).get("State", "X")
    return state[0] not in "ZXx"


def _describe(pid: int, tids: Iterable[int]) -> str:
    """Name threads with what they are doing, e.g. "thread 12 (worker, D (disk sleep))"."""
    parts = []
    for tid in sorted(tids):
        status = _status(pid, tid)
        parts.append(f"thread {tid} ({status.get('Name', '?')}, {status.get('State', 'gone')})")
    return ", ".join(parts)


def _why_not(pid: int, tid: int) -> str:
    """Say why the kernel refused to let us trace thread ``tid``, as well as we can tell."""
    what = f"PID {pid}" if tid == pid else f"thread {tid} of PID {pid}"
    status = _status(pid, tid)
    tracer = int(status.get("TracerPid", "0"))
    if tracer:  # The tracing thread; name its process.
        tgid = int(_status(tracer, tracer).get("Tgid", tracer))
        name = _status(tgid, tgid).get("Name", "?")
        return f"may not trace {what}: it is already traced by PID {tgid} ({name})"
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    if scope == "3":
        return f"may not trace {what}: kernel.yama.ptrace_scope is 3 (no tracing until reboot)"
    if scope in ("1", "2") and os.geteuid() != 0:
        return f"may not trace {what}: kernel.yama.ptrace_scope is {scope}; run livedump as root"
    uid = status.get("Uid", "").split()
    if uid and int(uid[0]) != os.geteuid() and os.geteuid() != 0:
        return (f"may not trace {what}: it belongs to uid {uid[0]}; run livedump as that user "
                "or root")
    return f"may not trace {what} (operation not permitted)"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
