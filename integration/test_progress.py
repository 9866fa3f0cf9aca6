"""The progress bar: on a terminal, with size, rate and time left; never otherwise."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from .conftest import livedump
from .vm import VM

# tqdm's frame: "livedump:  51%|█████    | 520M/1.00G [00:00<00:00, 1.87GB/s]"
FRAME = re.compile(r"livedump: +(\d+)%\|[^|]*\| *[\d.]+\w?/[\d.]+G "
                   r"\[[\d:]+<[\d:?]+, *[\d.?]+\w?B/s\]")


def on_a_terminal(*args: str) -> tuple[int, str, bytes]:
    """Run livedump with its standard error on a pseudo-terminal of 40x100;
    its status, what the terminal showed, and its standard output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "livedump", *args],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    while True:  # Read as it comes: a full terminal would hold the dump up.
        if select.select([master], [], [], 60)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: no writer is left
                chunk = b""
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read()
    return proc.wait(), shown.decode(), out


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    # 1 GiB of random bytes to write: a dump long enough for several frames.
    blob = tmp_path_factory.mktemp("progress") / "random.bin"
    blob.write_bytes(os.urandom(256 << 20))
    loaders = [arg for i in range(4) for arg in
               ("-device", f"loader,file={blob},addr={(i + 1) << 28:#x},force-raw=on")]
    with VM(memory="2G", extra=loaders) as vm:
        vm.wait_running(1)
        yield vm


def test_a_bar_with_rate_and_time_left_on_a_terminal_then_gone(vm, tmp_path):
    status, shown, _ = on_a_terminal("--pid", str(vm.pid), str(tmp_path / "a.vmcore"))
    assert status == 0, shown
    frames = list(FRAME.finditer(shown))
    assert len(frames) >= 2, shown  # the start, and at least one step with its rate
    assert int(frames[0].group(1)) == 0 and "/2.0" in frames[0].group(0)
    assert re.search(r", [\d.]+\w?B/s\]", frames[-1].group(0)), frames[-1].group(0)
    # The bar's line is blanked, then the report follows.
    report_at = shown.rindex("livedump: wrote ")
    assert re.search(r"\r {20,}\r$", shown[:report_at]), shown[report_at - 200:]


@pytest.mark.parametrize("quiet", [True, False])
def test_no_bar_with_quiet_or_without_a_terminal(vm, tmp_path, quiet):
    out = tmp_path / "b.vmcore"
    if quiet:
        status, shown, _ = on_a_terminal("--quiet", "--pid", str(vm.pid), str(out))
    else:
        r = livedump("--pid", str(vm.pid), str(out))  # standard error is a pipe
        status, shown = r.returncode, r.stderr.decode()
    assert status == 0, shown
    assert "%|" not in shown
    assert shown == "" if quiet else shown.startswith("livedump: wrote ")
