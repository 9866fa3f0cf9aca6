"""``livedump dmesg`` and ``watch`` on a real arm64 guest: Debian's arm64 kernel
under qemu-system-aarch64 (TCG), KASLR on, logging a line a second to /dev/kmsg.

makedumpfile on this host reads only x86_64 vmcores, so the ground truth is
the guest's serial console: every kernel line it printed must be in what
``dmesg`` prints, in order. With the default log buffer the log is in the
kernel image; with ``log_buf_len=`` it is in memory the kernel allocated at
boot, reached through the linear map: both of arm64's translations.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import livedump
from .linux_guest_arm64 import Arm64LinuxVM, fetchable

pytestmark = [pytest.mark.qemu, pytest.mark.linux]

ROOT = Path(__file__).resolve().parents[1]
# A kernel line on the console: its timestamp, then the text (the ground truth).
_LINE = re.compile(r"^\[\s*\d+\.\d{6}\] .*$", re.M)
# The one line init.sh writes with bytes the console prints raw and dmesg escapes.
AWKWARD = "LIVEDUMP-KMSG-BYTES tab\there café bell\x07 end"
AWKWARD_ESCAPED = "LIVEDUMP-KMSG-BYTES tab\there caf\\xffffffc3\\xffffffa9 bell\\x07 end"
_KMSG = re.compile(r"LIVEDUMP-KMSG n=(\d+)")


@pytest.fixture(scope="module", autouse=True)
def packages():
    why = fetchable()
    if why is not None:
        pytest.skip(why)


def as_console(lines: list[str]) -> list[str]:
    """dmesg's lines as the console prints them: a record's later lines (which
    dmesg indents as wide as the timestamp) with its timestamp too."""
    out, stamp = [], ""
    for line in lines:
        if line.startswith("["):
            stamp = line[: line.index("] ") + 2]
            out.append(line)
        else:
            out.append(stamp + line[len(stamp):])
    return out


@pytest.mark.parametrize("log_buf_len", [None, "4M"], ids=["image", "linear-map"])
def test_dmesg_prints_every_line_the_console_printed(log_buf_len):
    extra = ["livedump.kmsg=1"] + ([f"log_buf_len={log_buf_len}"] if log_buf_len else [])
    with Arm64LinuxVM(cmdline_extra=extra) as vm:
        vm.wait_idle(timeout=600)
        time.sleep(2)
        console = vm.console_text().replace(AWKWARD, AWKWARD_ESCAPED)
        r = livedump("dmesg", *vm.livedump_args())
        assert r.returncode == 0, r.stderr
        assert r.stderr == b""
        assert vm.status() == "running"
        printed = r.stdout.decode(errors="replace").splitlines()
        # Each console line, in the same order (dmesg has the debug lines too).
        lines = iter(as_console(printed))
        for line in _LINE.findall(console):
            assert any(p == line for p in lines), f"not in dmesg, or out of order: {line}"
        assert printed[0].startswith("[    0.000000] Booting Linux on physical CPU")
        assert f"] {AWKWARD_ESCAPED}" in r.stdout.decode(errors="replace")
        if log_buf_len:
            assert "log_buf_len: 4194304 bytes" in console

        # A line written after it started, read while the guest runs, and a paused read.
        seen = max(int(n) for n in _KMSG.findall(r.stdout.decode()))
        deadline = time.monotonic() + 120
        while True:
            later = livedump("dmesg", *vm.livedump_args(), "--json")
            assert later.returncode == 0, later.stderr
            texts = [json.loads(rec)["text"] for rec in later.stdout.splitlines()]
            if f"LIVEDUMP-KMSG n={seen + 2}" in texts:
                break
            assert time.monotonic() < deadline, texts[-5:]
            time.sleep(1)
        paused = livedump("dmesg", "--pause", *vm.livedump_args())
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.startswith(r.stdout)
        assert vm.status() == "running"


def test_watch_takes_a_vmcore_when_the_guest_panics(tmp_path):
    panic = "Kernel panic - not syncing: sysrq triggered crash"
    # The panic comes that long after /init started: after the boot, and after
    # watch started (checked below), even on a slow host.
    with Arm64LinuxVM(cmdline_extra=["livedump.panic_after=150"],
                      extra=["-name", "arm guest"]) as vm:
        vm.wait_idle(timeout=600)
        watch = subprocess.Popen([sys.executable, "-m", "livedump", "watch", "--once",
                                  "--json", *vm.livedump_args(), str(tmp_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            first = watch.stderr.readline()
            assert first.startswith(b"livedump watch: watching arm guest"), first
            assert panic not in vm.console_text(), "the guest panicked before watch started"
            stdout, stderr = watch.communicate(timeout=180)
        finally:
            watch.kill()
        assert watch.returncode == 0, stderr
        assert panic in vm.console_text()
        status = vm.status()
    report = json.loads(stdout)
    assert (report["trigger"], report["detail"]) == ("panic", f"kernel log: {panic}")
    assert report["error"] is None and report["dump"]["was_running"] and status == "running"
    [vmcore] = tmp_path.iterdir()
    assert vmcore.name.startswith("arm_guest-") and vmcore.stat().st_mode & 0o777 == 0o600
    data = vmcore.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183  # AArch64
    # The whole report was in the log by then (no makedumpfile here for arm64 vmcores).
    assert b"---[ end Kernel panic - not syncing: sysrq triggered crash ]---" in data
