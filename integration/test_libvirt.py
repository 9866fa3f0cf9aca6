"""livedump --domain against a real libvirtd and transient libvirt domains.

A paused domain's vmcore must equal libvirt's own ``virsh dump --memory-only``
byte for byte; a running one must be paused and resumed by libvirt and come
back running, with libvirtd alive; ``--via ptrace`` must leave libvirt's view
of the domain exactly as it was.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import livedump, sigterm_after
from .libvirt_harness import (
    Domain,
    Libvirtd,
    domstate,
    emulator,
    forget_emulator,
    readable_dir,
    virsh,
)
from .qemus import Qemu
from .vm import Marker, kvm_usable
from .vmcore import first_difference, identity, read_phys

pytest.importorskip("libvirt", reason="libvirt's Python binding: pip install '.[libvirt]'")
pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(shutil.which("libvirtd") is None or os.geteuid() != 0,
                       reason="needs libvirtd (libvirt-daemon-system) and root"),
]

MARKERS = [
    Marker(0x0010_0000, b"livedump marker: 1 MiB, in a libvirt domain"),
    Marker(0x1000_0000, os.urandom(64 << 10)),
    Marker(0x1F00_0000, b"livedump marker: 496 MiB, near the top of 512 MiB"),
]
KINDS = ["qemu"] + (["kvm"] if kvm_usable() else [])
TAINT = "tainted: custom-monitor"


@pytest.fixture(scope="module")
def libvirtd():
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def files():
    path = readable_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def emulators(files):
    """Each QEMU's ``<emulator>``, made once; libvirt forgets them afterwards."""
    made: dict[str, Path] = {}
    yield made
    for path in made.values():
        forget_emulator(path)


def emulator_of(qemu: Qemu, files: Path, emulators: dict[str, Path]) -> str:
    if qemu.series not in emulators:
        emulators[qemu.series] = emulator(qemu, files)
    return str(emulators[qemu.series])


@pytest.fixture
def domain_emulator(qemu, files, emulators) -> str:
    """Each QEMU in turn (conftest.py's ``qemu``), as libvirt starts it."""
    return emulator_of(qemu, files, emulators)


@pytest.fixture
def debug_emulator(debug_qemu, files, emulators) -> str:
    """Each QEMU built with debug info in turn, as libvirt starts it."""
    return emulator_of(debug_qemu, files, emulators)


def assert_markers(vmcore: Path) -> None:
    for m in MARKERS:
        assert read_phys(vmcore, m.gpa, len(m.data)) == m.data, f"marker at {m.gpa:#x}"


def dump_paused_and_compare(dom: Domain, scratch: Path, *via: str) -> dict:
    """livedump of the suspended domain against ``virsh dump --memory-only``; its report."""
    virsh("suspend", dom.name)
    before = domstate(dom.name)
    ours, theirs = scratch / "ours.vmcore", scratch / "libvirt.vmcore"
    r = livedump("--domain", dom.name, *via, "--json", str(ours))
    assert r.returncode == 0, r.stderr
    assert domstate(dom.name) == before == "paused (user)"
    virsh("dump", "--memory-only", dom.name, str(theirs))
    assert first_difference(ours, theirs) is None
    assert_markers(ours)
    return json.loads(r.stdout) | {"identity": (identity(ours), identity(theirs))}


@pytest.mark.parametrize("kind", KINDS)
def test_paused_domain_equals_virsh_dump(libvirtd, files, scratch, qemu, domain_emulator,
                                         kind):
    with Domain(files, MARKERS, kind, emulator=domain_emulator) as dom:
        dom.wait_for("running")
        # The domain runs that QEMU, not the system's.
        assert Qemu(Path(f"/proc/{dom.pid}/exe").resolve()).series == qemu.series
        report = dump_paused_and_compare(dom, scratch)
        assert report["via"] == "libvirt" and TAINT in report["detail"]
        assert report["was_running"] is False  # So libvirt's suspend was not used.
        # QEMU's CPU notes and ELF identity, by libvirt's own dump cut short.
        ours, theirs = report["identity"]
        assert ours == theirs and ("CORE", "NT_PRSTATUS") in ours[3]
        assert TAINT in dom.log()
        assert libvirtd.alive()


@pytest.mark.parametrize("kind", KINDS)
def test_running_domain_is_paused_and_resumed_by_libvirt(libvirtd, files, scratch,
                                                         domain_emulator, kind):
    with Domain(files, MARKERS, kind, emulator=domain_emulator) as dom:
        dom.wait_for("running")
        assert domstate(dom.name) == "running (booted)"
        out = scratch / "running.vmcore"
        r = livedump("--domain", dom.name, str(out))
        assert r.returncode == 0, r.stderr
        assert_markers(out)
        line = r.stderr.decode()
        assert "guest paused" in line and TAINT in line
        assert "notes from libvirt's memory-only dump" in line
        # libvirt did the pause: it records the resume as any 'virsh resume' ("unpaused").
        assert domstate(dom.name) == "running (unpaused)"
        assert libvirtd.alive()
        # A second dump of the same domain leaves libvirt's view exactly as it was.
        r = livedump("--domain", dom.name, "--force", str(out))
        assert r.returncode == 0, r.stderr
        assert domstate(dom.name) == "running (unpaused)"


def test_no_pause_leaves_the_domain_state_as_it_was(libvirtd, files, scratch, domain_emulator):
    with Domain(files, MARKERS, emulator=domain_emulator) as dom:
        dom.wait_for("running")
        out = scratch / "fuzzy.vmcore"
        r = livedump("--domain", dom.name, "--no-pause", "--json", str(out))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["paused"] is False
        assert_markers(out)
        assert domstate(dom.name) == "running (booted)"

        # Suspended already: QEMU's notes, by libvirt's dump, which leaves it suspended.
        report = dump_paused_and_compare(dom, scratch, "--no-pause")
        ours, theirs = report["identity"]
        assert ours == theirs and ("CORE", "NT_PRSTATUS") in ours[3]


@pytest.mark.parametrize("kind", KINDS)
def test_via_ptrace_leaves_libvirt_untouched(libvirtd, files, scratch, debug_emulator, kind):
    with Domain(files, MARKERS, kind, emulator=debug_emulator) as dom:
        dom.wait_for("running")
        before = domstate(dom.name)
        out = scratch / "ptrace.vmcore"
        r = livedump("--domain", dom.name, "--via", "ptrace", "--json", str(out))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["via"] == "ptrace"
        assert_markers(out)
        assert domstate(dom.name) == before == "running (booted)"
        out.unlink()
        dump_paused_and_compare(dom, scratch, "--via", "ptrace")
        assert TAINT not in dom.log()
        assert libvirtd.alive()


def test_hung_qemu_falls_back_to_ptrace(libvirtd, files, scratch, debug_emulator):
    """A QEMU whose monitor never answers (here: SIGSTOP) is dumped with ptrace."""
    with Domain(files, MARKERS, emulator=debug_emulator) as dom:
        dom.wait_for("running")
        before = domstate(dom.name)
        out = scratch / "hung.vmcore"
        os.kill(dom.pid, signal.SIGSTOP)
        try:
            r = livedump("--domain", dom.name, "--json", str(out))
        finally:
            os.kill(dom.pid, signal.SIGCONT)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["via"] == "ptrace"
        assert "could not pass a command to the monitor" in report["detail"]
        assert_markers(out)
        assert domstate(dom.name) == before
        assert libvirtd.alive()


@contextlib.contextmanager
def blocked_dump(dom: Domain) -> Iterator[subprocess.Popen]:
    """livedump writing into a pipe nobody reads: blocked mid-dump, the domain paused."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "livedump", "--domain", dom.name, "-"],
                            stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    try:
        dom.wait_for("paused")
        yield proc
    finally:
        os.close(r)
        proc.kill()


def test_sigkill_mid_dump_the_guardian_resumes_through_libvirt(libvirtd, files,
                                                               domain_emulator):
    with Domain(files, MARKERS, emulator=domain_emulator) as dom:
        with blocked_dump(dom) as proc:
            proc.kill()
            proc.wait()
            dom.wait_for("running")
        err = proc.stderr.read()
        assert b"its guardian resumed the guest" in err, err
        assert libvirtd.alive()


def test_sigkill_while_libvirt_may_open_the_notes_fifo(libvirtd, files):
    """killed as soon as the FIFO for QEMU's notes exists, before or after libvirtd
    opened it: libvirtd must not wait forever in open() for a reader that died."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("livedump-*"))
    with Domain(files, MARKERS) as dom:
        proc = subprocess.Popen([sys.executable, "-m", "livedump", "--domain", dom.name,
                                 "-"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (fifos := set(tmp.glob("livedump-*/notes")) - {d / "notes" for d in before}):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        proc.kill()
        proc.wait()
        dom.wait_for("running")
        assert b"its guardian resumed the guest" in proc.stderr.read()
        assert not any(f.exists() for f in fifos)  # and their directories gone with them
        assert dom.name in virsh("list", "--name", timeout=60)  # the domain not held
        assert libvirtd.alive()


def test_sigterm_mid_dump_resumes_through_libvirt(libvirtd, files):
    with Domain(files, MARKERS) as dom:
        with blocked_dump(dom) as proc:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert (proc.returncode, err) == (143, b"livedump: interrupted by SIGTERM\n")
        assert domstate(dom.name) == "running (unpaused)"


def test_signal_at_any_moment_leaves_the_domain_running(libvirtd, files):
    """SIGTERM at a spread of moments, from start-up through libvirt's calls to mid-copy."""
    with Domain(files, MARKERS) as dom:
        for delay in (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0):
            assert sigterm_after(delay, "--domain", dom.name) in (-signal.SIGTERM,
                                                                  128 + signal.SIGTERM), delay
            assert domstate(dom.name).startswith("running"), f"paused by a signal at {delay} s"
        assert libvirtd.alive()


def test_errors_are_one_line_with_their_own_exit_code(libvirtd, files, scratch):
    out = str(scratch / "x.vmcore")
    cases = [
        (["--domain", "livedump-no-such-domain"], 3, "no domain 'livedump-no-such-domain'"),
        (["--domain", "x", "--connect", "qemu+unix:///system?socket=/nonexistent"], 5,
         "libvirt could not connect to qemu+unix:///system?socket=/nonexistent"),
        (["--domain", "x", "--pid", "1"], 2, "--domain names the VM"),
        (["--pid", "1", "--connect", "qemu:///system"], 2, "--connect needs --domain"),
    ]
    with Domain(files, running=False) as dom:
        cases.append((["--domain", dom.name], 14, f"domain '{dom.name}' at qemu:///system "
                      "is not running"))
        for args, code, message in cases:
            r = livedump(*args, out)
            err = r.stderr.decode()
            assert r.returncode == code, err
            # One line (argparse's usage errors come after its usage text).
            assert message in err.splitlines()[-1], err
            assert code == 2 or err.count("\n") == 1, err
    assert os.listdir(scratch) == []
