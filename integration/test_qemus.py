"""The QEMUs of integration/qemus.py start as the tests need: the PID is QEMU's."""

import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from . import qemus

pytestmark = pytest.mark.qemu
AVAILABLE = qemus.available() | qemus.debug_builds()


@pytest.mark.parametrize("series", AVAILABLE)
def test_started_process_is_that_qemu(series):
    """livedump is pointed at the PID its caller started: that must be QEMU itself."""
    qemu = AVAILABLE[series]
    with tempfile.TemporaryDirectory(prefix="livedump-qemus-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        proc = subprocess.Popen([*qemu.command(), "-M", "none", "-display", "none", "-S",
                                 "-nodefaults", "-qmp", f"unix:{sock},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "no QMP socket"
                time.sleep(0.02)
            assert Path(f"/proc/{proc.pid}/exe").resolve() == qemu.binary.resolve()
            qmp = QEMUMonitorProtocol(str(sock))
            qmp.connect()
            try:
                version = qmp.cmd("query-version")["qemu"]
            finally:
                qmp.close()
            assert (version["major"], version["minor"], version["micro"]) == qemu.version
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


@pytest.mark.skipif(qemus.cached() is None,
                    reason="no QEMU 10.0 unpacked beside the system's (integration/setup --test)")
def test_unpacked_qemu_loads_its_own_modules():
    """Every module it knows is loaded; the system's, of another build, would abort it."""
    qemu = qemus.cached()
    assert qemu is not None
    r = subprocess.run([*qemu.command(), "-device", "help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"virtio-vga"' in r.stdout  # hw-display-virtio-vga.so
    assert r.stderr == ""


def test_partial_cache_is_not_taken(tmp_path):
    """Only a cache with its manifest, written last, counts."""
    (tmp_path / "root/usr/bin").mkdir(parents=True)
    (tmp_path / "root/usr/bin" / qemus.SYSTEM).touch()
    assert qemus.cached(tmp_path) is None
    (tmp_path / qemus.MANIFEST).write_text("qemu-system-x86 1:10.0.2\n")
    assert qemus.cached(tmp_path) == qemus.Qemu(tmp_path / "root/usr/bin" / qemus.SYSTEM,
                                                 tmp_path / "root")


def test_debug_build_goes_by_its_series(tmp_path):
    """A debug build is found where build-qemu-debug.sh caches it, and only as
    what it is: the 7.2 build in the 10.0 build's place is refused."""
    caches = {"10.0": tmp_path / "qemu-10.0-debug"}
    assert qemus.debug_builds(caches) == {}
    (caches["10.0"] / "bin").mkdir(parents=True)
    (caches["10.0"] / "bin" / qemus.SYSTEM).write_text("#!/bin/sh\n"
                                                     "echo 'QEMU emulator version 10.0.2'\n")
    (caches["10.0"] / "bin" / qemus.SYSTEM).chmod(0o755)
    [found] = qemus.debug_builds(caches).values()
    assert found.series == "10.0-debug" and found.command() == [str(found.binary)]
    (caches["10.0"] / "bin" / qemus.SYSTEM).write_text("#!/bin/sh\n"
                                                     "echo 'QEMU emulator version 7.2.22'\n")
    with pytest.raises(qemus.FetchError, match="holds QEMU 7.2-debug, not 10.0"):
        qemus.debug_builds(caches)


@pytest.mark.skipif(qemus.system() is None, reason="no qemu-system-x86_64 installed")
def test_the_systems_debug_build_goes_by_the_systems_series(tmp_path):
    """The debug build of Debian's own source is of the system QEMU's series:
    7.2 on Debian 12, 10.0 on Debian 13; of any other, it is refused."""
    own = qemus.system()
    assert own is not None
    caches = {qemus.OWN: tmp_path / "qemu-debug"}
    binary = caches[qemus.OWN] / "bin" / qemus.SYSTEM
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!/bin/sh\necho 'QEMU emulator version {own.series}.1'\n")
    binary.chmod(0o755)
    assert list(qemus.debug_builds(caches)) == [f"{own.series}-debug"]
    binary.write_text("#!/bin/sh\necho 'QEMU emulator version 9.9.1'\n")
    with pytest.raises(qemus.FetchError, match=f"holds QEMU 9.9-debug, not {own.series}$"):
        qemus.debug_builds(caches)
