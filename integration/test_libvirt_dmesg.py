"""``livedump dmesg --domain`` and ``livedump watch --domain`` against a real
libvirtd and a transient domain that boots the Linux test guest
(integration/linux_guest.py) under TCG, logging a line a second.

One domain for each QEMU (the system's and 10.0), as it boots slowly; the
last test makes it panic.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import QEMUS, livedump
from .libvirt_harness import (
    Domain,
    Libvirtd,
    domstate,
    emulator,
    forget_emulator,
    readable_dir,
    virsh,
)
from .linux_guest import (
    IDLE,
    SLOW_GUEST_TIMEOUTS,
    guest_files,
    kernel_cmdline,
    wait_for_console,
)
from .qemus import Qemu

pytest.importorskip("libvirt", reason="libvirt's Python binding: pip install '.[libvirt]'")
pytestmark = [
    pytest.mark.libvirt, pytest.mark.linux,
    pytest.mark.skipif(shutil.which("libvirtd") is None or os.geteuid() != 0,
                       reason="needs libvirtd (libvirt-daemon-system) and root"),
]

ROOT = Path(__file__).resolve().parents[1]
PANIC = "Kernel panic - not syncing: NMI: Not continuing"
AWKWARD = b"LIVEDUMP-KMSG-BYTES tab\there caf\\xffffffc3\\xffffffa9 bell\\x07 end\n"


@pytest.fixture(scope="module", params=list(QEMUS.values()), ids=list(QEMUS))
def domain(request):
    """The domain, run by each QEMU in turn (as libvirt starts it)."""
    vmlinuz, initramfs = guest_files()
    cmdline = kernel_cmdline(extra=["livedump.kmsg=1", "unknown_nmi_panic"])
    files = readable_dir()
    binary = emulator(request.param, files)
    try:
        with Libvirtd(), Domain(files, emulator=str(binary),
                                linux=(vmlinuz, initramfs, cmdline)) as dom:
            # The domain runs that QEMU, not the system's.
            assert Qemu(Path(f"/proc/{dom.pid}/exe").resolve()).series == request.param.series
            wait_for_console(dom.console, f"^{IDLE}\\b", timeout=300)
            yield dom
    finally:
        if binary.is_relative_to(files):  # a copy, going away: libvirt forgets its probe
            forget_emulator(binary)
        shutil.rmtree(files, ignore_errors=True)


def test_dmesg_of_a_running_domain_leaves_it_running(domain):
    r = livedump("dmesg", "--domain", domain.name, *SLOW_GUEST_TIMEOUTS)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert r.stdout.startswith(b"[    0.000000] Linux version ")
    assert AWKWARD in r.stdout
    # Not paused at all: libvirt's view is the boot's.
    assert domstate(domain.name) == "running (booted)"

    paused = livedump("dmesg", "--domain", domain.name, *SLOW_GUEST_TIMEOUTS, "--pause", "--json")
    assert paused.returncode == 0, paused.stderr
    records = [json.loads(line) for line in paused.stdout.splitlines()]
    assert records[0]["text"].startswith("Linux version")
    # libvirt paused and resumed it, as for a dump.
    assert domstate(domain.name) == "running (unpaused)"


def test_dmesg_of_a_suspended_domain_equals_makedumpfiles(domain, scratch):
    virsh("suspend", domain.name)
    try:
        ours = livedump("dmesg", "--domain", domain.name, *SLOW_GUEST_TIMEOUTS)
        assert ours.returncode == 0, ours.stderr
        vmcore = scratch / "domain.vmcore"
        r = livedump("-q", "--domain", domain.name, *SLOW_GUEST_TIMEOUTS, str(vmcore))
        assert r.returncode == 0, r.stderr
        assert domstate(domain.name) == "paused (user)"
    finally:
        virsh("resume", domain.name)
    theirs = scratch / "makedumpfile.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(theirs)], check=True,
                   capture_output=True)
    assert ours.stdout == theirs.read_bytes()
    assert AWKWARD in ours.stdout


def test_watch_takes_a_vmcore_when_the_domain_panics(domain, tmp_path):
    """Runs last: the domain's kernel panics (booted with unknown_nmi_panic and
    panic=0, it stays up, its vCPUs spinning)."""
    out = tmp_path / "vmcores"
    out.mkdir()
    watch = subprocess.Popen([sys.executable, "-m", "livedump", "watch", "--once", "--json",
                              "--domain", domain.name, *SLOW_GUEST_TIMEOUTS, str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        first = watch.stderr.readline()
        assert first.startswith(f"livedump watch: watching {domain.name}".encode()), first
        time.sleep(2)  # no trigger from the log as it was
        assert watch.poll() is None and list(out.iterdir()) == []
        virsh("inject-nmi", domain.name)
        stdout, stderr = watch.communicate(timeout=180)
    finally:
        watch.kill()
    assert watch.returncode == 0, stderr
    report = json.loads(stdout)
    assert (report["trigger"], report["detail"]) == ("panic", f"kernel log: {PANIC}")
    assert report["error"] is None and report["dump"]["via"] == "libvirt"
    [vmcore] = out.iterdir()
    assert vmcore.name.startswith(f"{domain.name}-") and vmcore.suffix == ".vmcore"
    assert vmcore.stat().st_mode & 0o777 == 0o600
    # Left as it was: running (the panicked kernel spins), resumed by libvirt.
    assert report["dump"]["was_running"]
    assert domstate(domain.name).startswith("running")
    text = tmp_path / "dmesg.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(text)], check=True,
                   capture_output=True)
    assert PANIC in text.read_text(errors="replace")
