"""``livedump watch`` on a real Linux guest that dies: booted with
``unknown_nmi_panic``, it panics on QMP's ``inject-nmi``; watch takes a vmcore
whose log (makedumpfile's, and crash's with ``-m analysis``) shows the panic,
and leaves the VM as it was. One guest for the module: it boots slowly."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .linux_guest import LinuxVM, debug_vmlinux

pytestmark = [pytest.mark.qemu, pytest.mark.linux]

ROOT = Path(__file__).resolve().parents[1]
PANIC = "Kernel panic - not syncing: NMI: Not continuing"


def watch_a_panic(out: Path, extra: list[str]):
    """Watch a guest, make it panic; (the watch's report, the VM's status, the vmcore)."""
    with LinuxVM(machine="q35", memory="512M", cmdline_extra=["unknown_nmi_panic"],
                 extra=["-name", "watched guest", *extra]) as vm:
        vm.wait_idle(timeout=300)
        watch = subprocess.Popen([sys.executable, "-m", "livedump", "watch", "--once",
                                  "--json", *vm.livedump_args(), str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            first = watch.stderr.readline()
            assert first.startswith(b"livedump watch: watching watched guest"), first
            time.sleep(2)  # no trigger from the log as it was
            assert watch.poll() is None and list(out.iterdir()) == []
            vm.command("inject-nmi")
            stdout, stderr = watch.communicate(timeout=180)
        finally:
            watch.kill()
        assert watch.returncode == 0, stderr
        status = vm.status()
    [vmcore] = out.iterdir()
    return json.loads(stdout), status, vmcore


@pytest.fixture(scope="module")
def panicked(tmp_path_factory):
    return watch_a_panic(tmp_path_factory.mktemp("watch"), [])


def test_qemus_panic_event_gets_a_vmcore_and_the_vm_stays_paused(tmp_path):
    # With a pvpanic device (its driver loaded by the guest's /init) QEMU hears
    # of the panic and pauses the VM (as told: QEMU's default is to end it).
    report, status, vmcore = watch_a_panic(tmp_path, ["-device", "pvpanic", "-action",
                                                      "panic=pause"])
    assert "QEMU's GUEST_PANICKED event (action pause)" in report["detail"], report
    assert f"kernel log: {PANIC}" in report["detail"], report
    assert status == "guest-panicked"
    assert not report["dump"]["was_running"]  # left as QEMU left it: paused
    text = tmp_path / "dmesg.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(text)], check=True,
                   capture_output=True)
    assert PANIC in text.read_text(errors="replace")


def test_a_panic_in_the_log_gets_a_vmcore(panicked):
    report, status, vmcore = panicked
    assert report["trigger"] == "panic"
    assert report["detail"] == f"kernel log: {PANIC}"
    assert report["error"] is None and report["dump"]["output"] == str(vmcore)
    assert vmcore.name.startswith("watched_guest-") and vmcore.suffix == ".vmcore"
    assert vmcore.stat().st_mode & 0o777 == 0o600
    # The VM as it was: the panicked kernel spins (panic=0), the vCPUs run.
    assert report["dump"]["was_running"] and status == "running"
    text = vmcore.parent / "dmesg.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(text)], check=True,
                   capture_output=True)
    log = text.read_text(errors="replace")
    assert PANIC in log
    # The log had settled: the whole report is in the vmcore.
    assert "---[ end Kernel panic - not syncing: NMI: Not continuing ]---" in log


@pytest.mark.analysis
def test_crashs_log_shows_the_panic(panicked):
    _, _, vmcore = panicked
    r = subprocess.run(["crash", "-s", str(debug_vmlinux()), str(vmcore)], input="log\nquit\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert PANIC in r.stdout
