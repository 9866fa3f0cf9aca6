import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from . import qemus

OPT_IN = {"analysis": "needs an 858 MB download; run with -m analysis"}


def pytest_collection_modifyitems(config, items):
    """Tests of an opt-in tier run only when ``-m`` names it."""
    chosen = config.getoption("markexpr") or ""
    for name, why in OPT_IN.items():
        if name not in chosen:
            for item in items:
                if name in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report says what each QEMU still running was doing (a
    fixture's guest): whether a monitor that did not answer was busy or blocked."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        from .vm import RUNNING

        for vm in list(RUNNING.values()):
            try:
                report.sections.append((f"QEMU {vm.pid}", vm.describe()))
            except Exception as e:  # A diagnosis must not hide the failure.
                report.sections.append((f"QEMU {vm.pid}", f"not described: {e}"))


# The x86 QEMUs this machine has, by series ("7.2", "10.0"), and those built
# with debug info for ptrace mode ("7.2-debug", "10.0-debug"): each a test id,
# so ``-k 10.0`` picks one QEMU's runs.
QEMUS = qemus.available()
DEBUG_QEMUS = qemus.debug_builds()


def _each(found: dict[str, qemus.Qemu], missing: str) -> list:
    """The QEMUs as parameters; none found, one skipped parameter that says why."""
    if not found:
        return [pytest.param(None, id="no-qemu", marks=pytest.mark.skip(reason=missing))]
    return [pytest.param(qemu, id=series) for series, qemu in found.items()]


@pytest.fixture(params=_each(QEMUS, "no qemu-system-x86_64: run integration/setup"))
def qemu(request) -> qemus.Qemu:
    """Each QEMU in turn, for the tests whose outcome depends on the QEMU: the
    system's and QEMU 10.0 (integration/qemus.py)."""
    return request.param


@pytest.fixture(params=_each(DEBUG_QEMUS, "no QEMU with debug info: run "
                                          "integration/build-qemu-debug.sh [10.0]"))
def debug_qemu(request) -> qemus.Qemu:
    """Each QEMU built with debug info in turn, for the tests of ``--via ptrace``."""
    return request.param


@pytest.fixture
def small_disk(scratch):
    """A 16 MiB tmpfs inside ``scratch``, for dumps that must run out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = scratch / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.fixture
def scratch():
    """A directory for vmcores: on tmpfs where there is one, as dumps are large."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="livedump-test-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def livedump(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "livedump", *args], stderr=subprocess.PIPE,
                          timeout=timeout, **kwargs)


def sigterm_after(delay: float, *args: str) -> int:
    """Run livedump with ``args``, writing to a pipe nobody reads (so it stalls
    mid-dump, the guest paused), send it SIGTERM after ``delay`` s; its status,
    once it is known to have said no more than the one line an interrupt earns."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "livedump", *args, "-"],
                            stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(r)
        proc.kill()
    # Killed before its handlers were in place, it says nothing.
    said = {-signal.SIGTERM: b"", 128 + signal.SIGTERM: b"livedump: interrupted by SIGTERM\n"}
    assert err == said.get(proc.returncode, err), (delay, err)
    return proc.returncode
