"""Closed standard file descriptors: guest memory goes to the vmcore and nowhere else.

A process started with fd 0, 1 or 2 closed hands that number to the next
file or socket it opens. livedump is run through a shell with ``<&-``,
``>&-`` and ``2>&-``, its monitor connection through a relay that keeps
every byte livedump sends, and a guest that writes its memory all the
time: afterwards the guest still runs and counts, its monitor answers, and
the marker placed in guest RAM is found in the vmcore alone.
"""

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .counting import assert_counts
from .qmp_proxy import QMPProxy
from .vm import COUNTING_PC, VM, Marker

ROOT = Path(__file__).resolve().parents[1]  # this checkout's livedump, whatever the cwd
MARKER_GPA = 0x20_0000
MARKER = b"livedump-stdio-" + os.urandom(16).hex().encode()  # found nowhere by chance


@pytest.fixture(scope="module")
def vm() -> Iterator[VM]:
    with VM(memory="64M", platform=COUNTING_PC, markers=[Marker(MARKER_GPA, MARKER)]) as vm:
        yield vm


@pytest.fixture
def tap(vm: VM) -> Iterator[QMPProxy]:
    """A relay to QEMU's monitor that keeps every byte livedump sends (as QEMU's own
    socket, so that livedump takes it for QEMU's)."""
    tap = QMPProxy(vm.socket)
    yield tap
    tap.close()


def run(redirections: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """livedump run by a shell with ``redirections`` applied to it alone."""
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {redirections}', "sh", sys.executable, "-m", "livedump", *args],
        cwd=cwd, capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


CLOSED = ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"]


@pytest.mark.parametrize("closed", CLOSED)
def test_file_output_with_closed_fds(vm: VM, tap: QMPProxy, tmp_path: Path, closed: str) -> None:
    r = run(closed, "--pid", str(vm.pid), "--qmp", tap.qmp, "out.vmcore", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if "2>&-" in closed.split():
        assert r.stderr == b""
    else:
        assert r.stderr.startswith(b"livedump: wrote out.vmcore: ")
    out = tmp_path / "out.vmcore"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert MARKER in out.read_bytes()
    assert MARKER not in tap.received
    assert tap.received  # It did go through the relay.
    assert_counts(vm)


@pytest.mark.parametrize("closed", CLOSED)
def test_stdout_output_with_closed_fds(vm: VM, tap: QMPProxy, tmp_path: Path, closed: str) -> None:
    """``-``: refused at once if standard output is closed; else the stream is the vmcore alone."""
    out = tmp_path / "stream.vmcore"
    r = run(f"> {out} {closed}", "--pid", str(vm.pid), "--qmp", tap.qmp, "-",
            cwd=tmp_path)
    if ">&-" in closed.split():
        assert r.returncode == 2
        if "2>&-" not in closed.split():
            assert r.stderr == (b"livedump: standard output is closed: give a file for the "
                                b"vmcore, or redirect standard output to where it should go\n")
        assert out.read_bytes() == b""
        assert not tap.received  # Refused before the monitor was as much as greeted.
    else:
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        assert data.startswith(b"\x7fELF") and MARKER in data
        assert b"livedump: " not in data  # The report went to standard error, or nowhere.
        if "2>&-" in closed.split():
            assert r.stderr == b""
        # Just as long as a dump of the same VM to a file.
        assert run("", "--pid", str(vm.pid), "--qmp", tap.qmp, "--quiet", "file.vmcore",
                   cwd=tmp_path).returncode == 0
        assert len(data) == (tmp_path / "file.vmcore").stat().st_size
    assert MARKER not in tap.received
    assert_counts(vm)


def test_stdout_closed_with_the_monitor_alone(vm: VM, tmp_path: Path) -> None:
    """Named by its monitor alone (no relay: its peer must be QEMU), the monitor
    connection was the first thing opened, fd 1, and took the vmcore."""
    r = run(">&-", "--qmp", str(vm.socket), "-", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith(b"livedump: standard output is closed: ")
    assert_counts(vm)
    assert os.listdir(tmp_path) == []
