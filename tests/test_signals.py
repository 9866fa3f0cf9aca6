"""signals: terminating signals become Interrupted, and wait while held off."""

import os
import signal
import threading
import time

import pytest

from livedump import signals
from livedump.errors import Interrupted


@pytest.fixture
def bystander():
    """A thread that blocks no signal, as a library's own thread does (OpenBLAS's,
    which numpy starts): the kernel gives it what the main thread holds off."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait, daemon=True)
    thread.start()
    yield thread
    done.set()
    thread.join()


def test_a_signal_in_the_block_is_raised_at_its_end(terminating_signals_raise):
    reached = False
    with pytest.raises(Interrupted) as e:
        with signals.deferred():
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            time.sleep(0.05)
            reached = True
    assert reached and e.value.exit_code == 128 + signal.SIGTERM


def test_a_signal_given_to_another_thread_still_waits_for_the_block(terminating_signals_raise,
                                                                    bystander):
    reached = False
    with pytest.raises(Interrupted) as e:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # To the process: the bystander takes it.
            for _ in range(50):  # The handler runs in this thread, at any of these.
                time.sleep(0.001)
            reached = True
    assert reached and e.value.exit_code == 128 + signal.SIGINT


def test_nested_blocks_raise_once_at_the_outermost_end(terminating_signals_raise, bystander):
    inner_done = False
    with pytest.raises(Interrupted):
        with signals.deferred():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.02)
            inner_done = True
            time.sleep(0.02)
    assert inner_done
    with signals.deferred():  # Nothing left pending.
        time.sleep(0.01)


def test_an_exception_relayed_from_a_thread_waits_for_the_block_too(terminating_signals_raise):
    error = Interrupted(signal.SIGTERM, "relayed")
    reached = False
    with pytest.raises(Interrupted) as e:
        with signals.deferred():
            worker = threading.Thread(target=signals.raise_in_main, args=(error,))
            worker.start()
            worker.join()
            time.sleep(0.02)
            reached = True
    assert reached and e.value is error


def test_outside_a_block_a_signal_is_raised_at_once(terminating_signals_raise):
    with pytest.raises(Interrupted):
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        time.sleep(1)
