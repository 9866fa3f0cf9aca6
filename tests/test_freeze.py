"""Freezing real processes with ptrace: tests/fixtures/threads.c, and a firmware-only QEMU."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ptrace.binding import func

from livedump.errors import FreezeError, Interrupted, PermissionDenied, ProcessNotFound
from livedump.ptrace import freeze
from livedump.ptrace.freeze import frozen

FIXTURE = Path(__file__).parent / "fixtures" / "threads.c"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def threads_bin(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("threads") / "threads"
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", binary, FIXTURE], check=True)
    return binary


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.002)


def thread_states(pid: int) -> dict[int, str]:
    """Field 3 of /proc/PID/task/*/stat for every thread."""
    states = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states[int(tid)] = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            pass  # Exited since listed.
    return states


def tracers(pid: int) -> dict[int, int]:
    """TracerPid of every thread."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                found[int(tid)] = int(next(x for x in f if x.startswith("TracerPid:")).split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # Exited since listed.
    return found


class Target:
    """A fixture program, its counters read from outside through /proc/PID/mem."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        addr, n = self.proc.stdout.readline().split()
        self.addr, self.n = int(addr, 16), int(n)

    def counters(self) -> list[int]:
        with open(f"/proc/{self.pid}/mem", "rb") as f:
            f.seek(self.addr)
            raw = f.read(8 * self.n)
        return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]

    def moving(self) -> bool:
        before = self.counters()
        time.sleep(0.02)
        return self.counters() != before

    def still(self) -> bool:
        before = self.counters()
        time.sleep(0.05)
        return self.counters() == before

    def states(self) -> dict[int, str]:
        return thread_states(self.pid)

    def close(self) -> None:
        self.proc.kill()
        # Bounded: a thread left traced by this process would make it wait for ever.
        self.proc.wait(timeout=30)


@pytest.fixture
def start(threads_bin) -> Iterator[Callable[..., Target]]:
    targets: list[Target] = []

    def start(*args: str) -> Target:
        targets.append(Target(threads_bin, *args))
        return targets[-1]

    yield start
    for t in targets:
        t.close()


@pytest.fixture
def counting(start) -> Target:
    t = start("count", "4")
    wait_for(lambda: len(t.states()) == 5 and all(t.counters()))
    return t


def assert_all_traced(t: Target) -> None:
    states = t.states()
    assert states and set(states.values()) == {"t"}, states


def assert_none_traced(pid: int) -> None:
    states = thread_states(pid)
    assert "t" not in states.values(), states
    assert threading.get_native_id() not in tracers(pid).values()


def test_counters_stand_still_while_frozen_and_move_after(counting):
    with frozen(counting.pid) as pause:
        assert pause.was_running
        assert_all_traced(counting)
        assert counting.still()
    assert 0.05 <= pause.seconds < 5
    assert_none_traced(counting.pid)
    wait_for(counting.moving)


def test_stopped_process_stays_stopped(counting):
    os.kill(counting.pid, signal.SIGSTOP)
    wait_for(lambda: set(counting.states().values()) == {"T"})
    with frozen(counting.pid) as pause:
        assert not pause.was_running
        assert_all_traced(counting)
    # Detached threads pass through R on their way back into the group-stop.
    wait_for(lambda: set(counting.states().values()) == {"T"})
    assert counting.still()
    os.kill(counting.pid, signal.SIGCONT)
    wait_for(counting.moving)


@pytest.mark.parametrize("sent, state", [(signal.SIGSTOP, {"T"}), (signal.SIGCONT, {"R", "S"})])
def test_job_control_while_frozen_takes_effect_after(counting, sent, state):
    if sent == signal.SIGCONT:
        os.kill(counting.pid, signal.SIGSTOP)
        wait_for(lambda: set(counting.states().values()) == {"T"})
    with frozen(counting.pid):
        os.kill(counting.pid, sent)
        time.sleep(0.02)
        assert_all_traced(counting)
    wait_for(lambda: set(counting.states().values()) <= state)
    if sent == signal.SIGCONT:
        wait_for(counting.moving)
    else:
        assert counting.still()


def test_thread_churn_is_frozen_whole_every_time(start):
    t = start("churn")
    wait_for(lambda: t.counters()[0] > 10)
    for _ in range(30):
        with frozen(t.pid):
            assert_all_traced(t)
            assert t.still()
        assert_none_traced(t.pid)
    assert t.proc.poll() is None
    wait_for(t.moving)


def test_signal_delivered_during_the_attach_is_passed_on(start, monkeypatch):
    t = start("signals")
    wait_for(lambda: t.counters()[0] > 1000)
    seize, passed_on = freeze._Ptrace.seize, []

    def slow_seize(self, tid):
        seize(self, tid)
        time.sleep(0.002)  # Time for the thread's own SIGUSR1 to stop it first.

    def detach(self, tid, signum):
        passed_on.append(signum)
        func.ptrace(func.PTRACE_DETACH, tid, 0, signum)

    monkeypatch.setattr(freeze._Ptrace, "seize", slow_seize)
    monkeypatch.setattr(freeze._Ptrace, "detach", detach)
    for _ in range(10):
        with frozen(t.pid):
            pass
    assert signal.SIGUSR1 in passed_on
    wait_for(t.moving)
    sent, handled, lost = t.counters()
    assert lost == 0 and handled >= sent - 1


def test_exception_in_the_block_lets_go(counting):
    with pytest.raises(ZeroDivisionError):
        with frozen(counting.pid):
            raise ZeroDivisionError
    assert_none_traced(counting.pid)
    wait_for(counting.moving)


HOLDER = """
import sys, time
from livedump import signals
from livedump.errors import Interrupted
from livedump.ptrace.freeze import frozen
signals.install()
try:
    with frozen(int(sys.argv[1])):
        print("frozen", flush=True)
        time.sleep(60)
except Interrupted as e:
    sys.exit(e.exit_code)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_in_the_block_lets_go(counting, signum):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(counting.pid)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "frozen\n"
        assert_all_traced(counting)
        holder.send_signal(signum)
        assert holder.wait(timeout=10) == 128 + signum
    finally:
        holder.kill()
        holder.wait()
    assert_none_traced(counting.pid)
    wait_for(counting.moving)


def test_signal_during_the_attach_waits_for_it_then_lets_go(counting, monkeypatch,
                                                           terminating_signals_raise):
    interrupt = freeze._Ptrace.interrupt

    def interrupt_and_signal(self, tid):
        interrupt(self, tid)
        os.kill(os.getpid(), signal.SIGTERM)  # Held until every thread is stopped.

    monkeypatch.setattr(freeze._Ptrace, "interrupt", interrupt_and_signal)
    with pytest.raises(Interrupted) as e:
        with frozen(counting.pid):
            pytest.fail("the block ran despite the signal")
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert_none_traced(counting.pid)
    wait_for(counting.moving)


TRACER = """
import os, sys, time
from ptrace.binding import func
pid = int(sys.argv[1])
tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
for tid in tids if sys.argv[2] == "all" else tids[-1:]:
    func.ptrace(0x4206, tid)  # PTRACE_SEIZE: traced, still running.
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("which", ["all", "last"])
def test_process_traced_by_another_is_refused_and_left_alone(counting, which):
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(counting.pid), which],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline() == "ready\n"
        before = tracers(counting.pid)
        with pytest.raises(PermissionDenied, match=rf"already traced by PID {tracer.pid} \(python"):
            with frozen(counting.pid):
                pytest.fail("froze a process that another tracer holds")
        assert tracers(counting.pid) == before
        assert_none_traced(counting.pid)
        wait_for(counting.moving)
    finally:
        tracer.kill()
        tracer.wait()


def test_no_such_process():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    with pytest.raises(ProcessNotFound, match=f"no process with PID {pid}"):
        with frozen(pid):
            pytest.fail("froze nothing")


def test_process_killed_while_frozen(counting):
    with frozen(counting.pid):
        counting.proc.kill()
    counting.proc.wait(timeout=5)


def test_thread_in_uninterruptible_sleep_times_out_and_is_let_go(start):
    t = start("vfork", "800")
    wait_for(lambda: "D" in t.states().values())
    stuck = r"could not stop thread \d+ \(threads, D .* within 0.1 s"
    with pytest.raises(FreezeError, match=stuck):
        with frozen(t.pid, timeout=0.1):
            pytest.fail("froze a thread in uninterruptible sleep")
    assert_none_traced(t.pid)  # Once its vfork child exited, it stopped and was detached.
    wait_for(lambda: t.counters()[0] > 0)


def test_a_thread_asleep_longer_than_the_grace_is_waited_for_and_let_go(start):
    # Asleep in the kernel past the grace (as on a loaded host, or a slow disk):
    # letting go waits until it wakes and stops, then detaches it, instead of
    # leaving it traced until livedump exits.
    t = start("vfork", str(int(freeze._GRACE * 1000) + 1500))
    wait_for(lambda: "D" in t.states().values())
    with pytest.raises(FreezeError, match=r"could not stop thread \d+ \(threads, D "):
        with frozen(t.pid, timeout=0.1):
            pytest.fail("froze a thread in uninterruptible sleep")
    assert_none_traced(t.pid)
    wait_for(lambda: t.counters()[0] > 0, timeout=10)


def test_a_thread_still_held_is_reported(counting, monkeypatch):
    tid = max(counting.states())
    freeze._Ptrace().seize(tid)
    freeze._Ptrace().interrupt(tid)
    try:
        os.waitpid(tid, freeze._WALL)
        monkeypatch.setattr(freeze, "_GRACE", 0.1)
        held = rf"thread {tid} \(threads, t \(tracing stop\)\) .* could not be let go"
        with pytest.raises(FreezeError, match=held):
            freeze._Threads(counting.pid)._verify()
    finally:
        freeze._Ptrace().detach(tid, 0)
    assert_none_traced(counting.pid)


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(str(path)) == 0


def qmp(path: Path, command: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        lines = s.makefile("rwb")
        json.loads(lines.readline())
        for execute in ("qmp_capabilities", command):
            lines.write(json.dumps({"execute": execute}).encode() + b"\n")
            lines.flush()
            while "return" not in (reply := json.loads(lines.readline())):
                assert "event" in reply, reply
        return reply["return"]


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
def test_firmware_only_qemu(tmp_path):
    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "pc", "-m", "128M", "-display", "none", "-nodefaults",
         "-accel", "kvm", "-accel", "tcg", "-name", "freeze,debug-threads=on",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: listening(sock), timeout=20)
        assert qmp(sock, "query-status")["running"]
        names = {}
        for tid in os.listdir(f"/proc/{qemu.pid}/task"):
            names[int(tid)] = Path(f"/proc/{qemu.pid}/task/{tid}/comm").read_text().strip()
        assert any(n.startswith("CPU 0/") for n in names.values()), names
        with frozen(qemu.pid) as pause:
            assert pause.was_running
            states = thread_states(qemu.pid)
            assert set(states.values()) == {"t"}, states
        assert_none_traced(qemu.pid)
        assert qmp(sock, "query-status")["running"]  # Its main loop and vCPUs carry on.
    finally:
        qemu.kill()
        qemu.wait()
