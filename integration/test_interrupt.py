"""The VM comes back on every way out: signals mid-dump, and a reader that goes away."""

import gc
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from livedump import signals
from livedump.errors import Interrupted
from livedump.qmp.monitor import Monitor
from livedump.qmp.transport import QMPTransport

from .conftest import sigterm_after
from .qmp_proxy import QMPProxy
from .vm import VM


def wait_for_status(vm: VM, status: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while vm.status() != status:
        assert time.monotonic() < deadline, f"VM never became {status}"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_dump_resumes_the_vm(scratch, qemu, sig):
    with VM(memory="1G", qemu=qemu) as vm:
        # livedump writes into a pipe nobody reads: it blocks mid-dump, VM paused.
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "livedump", "--pid", str(vm.pid), "-"],
                                stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        try:
            wait_for_status(vm, "paused")
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            os.close(r)
            proc.kill()
        assert proc.returncode == 128 + sig
        assert err == f"livedump: interrupted by {sig.name}\n".encode()
        assert vm.status() == "running"


def test_signal_as_a_monitor_exchange_begins_waits_for_its_reply(scratch, qemu, monkeypatch):
    """A signal that lands just after a command's coroutine is made neither tears the
    command nor leaves the coroutine unawaited: it takes effect once the reply is in."""
    with VM(memory="64M", qemu=qemu) as vm:
        transport = QMPTransport(str(vm.socket), timeout=10)
        make = transport._client.execute

        def signalled(*args: object) -> object:
            exchange = make(*args)
            os.kill(os.getpid(), signal.SIGINT)
            return exchange

        monkeypatch.setattr(transport._client, "execute", signalled)
        old = {sig: signal.getsignal(sig) for sig in signals.TERMINATING}
        # What earlier tests in this process left (an event loop of the
        # harness's QMP client, say) is collected first: only this exchange's counts.
        gc.collect()
        signals.install()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with pytest.raises(Interrupted):
                    Monitor(transport).stop()
                gc.collect()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            monkeypatch.undo()
            transport.close()
        assert [str(w.message) for w in caught] == []
        assert vm.status() == "paused"  # 'stop' ran to its reply before the signal acted


def test_closed_pipe_resumes_the_vm_and_fails(scratch, qemu):
    with VM(memory="1G", qemu=qemu) as vm:
        proc = subprocess.run(
            f"{sys.executable} -m livedump --pid {vm.pid} - | head -c 1000 >/dev/null; "
            "echo ${PIPESTATUS[0]} >&2",
            shell=True, executable="/bin/bash", capture_output=True, timeout=60,
        )
        err = proc.stderr.decode().splitlines()
        assert err == ["livedump: the reader of standard output went away", "8"]
        assert vm.status() == "running"



def test_signal_at_any_moment_leaves_the_vm_running(scratch, qemu):
    """Signals sent at a spread of moments, from start-up to mid-copy."""
    with VM(memory="1G", qemu=qemu) as vm:
        for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 0.8):
            # Before livedump installs its handlers the default action ends it (-15).
            assert sigterm_after(delay, "--pid", str(vm.pid)) in (-signal.SIGTERM,
                                                                  128 + signal.SIGTERM), delay
            assert vm.status() == "running", f"VM left paused by a signal after {delay} s"


@pytest.mark.parametrize("command", ["stop", "cont"])
def test_signal_while_a_monitor_command_is_in_flight(scratch, qemu, command):
    """The signal lands while QEMU's reply to stop (or cont) is held back."""
    # Held long enough that the signal lands in the hold even on a slow host; the
    # monitor limit outlasts the hold, so livedump waits rather than gives up.
    with VM(memory="512M", qemu=qemu) as vm, QMPProxy(vm.socket, command, delay=10) as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-m", "livedump", "--pid", str(vm.pid), "--qmp", str(proxy.path),
             "--qmp-timeout", "60", str(scratch / "x.vmcore")], stderr=subprocess.PIPE)
        try:
            assert proxy.seen.wait(30)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert (proc.returncode, err) == (143, b"livedump: interrupted by SIGTERM\n")
        assert vm.status() == "running"
        assert os.listdir(scratch) == []
