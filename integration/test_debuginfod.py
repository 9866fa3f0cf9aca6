"""livedump's debuginfod client against elfutils' own debuginfod server.

The server (Debian package debuginfod) indexes a directory holding the debug
file of the test fixture. It has no option to choose its address and
listens on every interface, on a free port, for the few seconds of a test.
"""

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from livedump.errors import DebugInfoError
from livedump.ptrace import debuginfo, dwarf
from tests.test_dwarf import build, split

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("debuginfod", "gcc", "objcopy")),
    reason="needs debuginfod (apt-get install debuginfod), gcc and binutils")

READY_SECONDS = 60  # debuginfod's first scan, on a loaded host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(url: str) -> None:
    """Until the server's first scan has indexed ``url``'s file."""
    deadline = time.monotonic() + READY_SECONDS
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def fixture_qemu(tmp_path, monkeypatch) -> tuple[Path, str]:
    """The fixture, stripped, its DWARF in a directory debuginfod serves, and that server's URL."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DEBUGINFOD_CACHE_PATH", str(tmp_path / "debuginfod-client"))
    monkeypatch.setattr(debuginfo, "DEBUG_DIRS", [tmp_path / "no-debug-dir"])
    exe = build(tmp_path / "build")
    split(exe, tmp_path / "served/qemu.debug")
    port = free_port()
    with open(tmp_path / "debuginfod.log", "wb") as log:
        server = subprocess.Popen(
            ["debuginfod", "-F", "-p", str(port), "-d", str(tmp_path / "index.sqlite"),
             "-t", "0", "-g", "0", str(tmp_path / "served")],
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield exe, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_fetch_from_elfutils_debuginfod(fixture_qemu, tmp_path, monkeypatch):
    exe, url = fixture_qemu
    build_id = debuginfo.read_build_id(exe)
    start = time.monotonic()
    wait_until_served(f"{url}/buildid/{build_id}/debuginfo")
    ready = time.monotonic() - start
    assert ready < READY_SECONDS
    monkeypatch.setenv("DEBUGINFOD_URLS", url)
    found = debuginfo.find_debug_file(str(exe))
    assert found == tmp_path / "debuginfod-client" / build_id / "debuginfo"
    assert found.read_bytes() == (tmp_path / "served/qemu.debug").read_bytes()
    layout = dwarf.load_layout(str(exe), found)
    assert layout.structs["AddressSpace"]["current_map"].offset == 32


def test_unknown_build_id_is_a_404(fixture_qemu, tmp_path, monkeypatch):
    exe, url = fixture_qemu
    wait_until_served(f"{url}/buildid/{debuginfo.read_build_id(exe)}/debuginfo")
    other = build(tmp_path / "other", "-DINT128_SCALAR")
    subprocess.run(["objcopy", "--strip-debug", str(other)], check=True)
    monkeypatch.setenv("DEBUGINFOD_URLS", url)
    with pytest.raises(DebugInfoError, match="HTTP 404"):
        debuginfo.find_debug_file(str(other))
