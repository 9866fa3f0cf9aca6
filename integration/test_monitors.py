"""Every kind of QMP monitor QEMU offers gives the vmcore QEMU's own dump would be,
on each QEMU (conftest.py's ``qemu``).

Pretty-printed monitors (``-qmp-pretty``, ``-mon ...,pretty=on``), monitors
defined in a ``-readconfig`` file, and monitors on TCP, where no file
descriptor can pass and QEMU's one-page dump for the CPU notes goes to a
private file instead: in QEMU's own ``/tmp`` whoever QEMU runs as, and
whatever ``/tmp`` it sees. Each on a guest that writes its memory all the
time: dumped while it runs, it counts on after; dumped while paused, the
vmcore is QEMU's (memory, ELF identity, notes).
"""

import contextlib
import ctypes
import glob
import json
import os
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import livedump
from .counting import assert_counts
from .qemus import Qemu
from .vm import COUNTING_PC, VM
from .vmcore import first_difference, identity


def dumps_as_qemu(vm: VM, scratch: Path, *args: str) -> dict:
    """livedump ``args``: the VM dumped while running counts on; dumped while paused,
    the vmcore is QEMU's own dump of it. The first run's report."""
    r = livedump("--json", *args, str(scratch / "running.vmcore"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["pid"], report["via"]) == (vm.pid, "qmp")
    assert report["cpu_notes"] == "CORE, QEMU notes from QEMU's dump-guest-memory"
    assert_counts(vm)
    vm.command("stop")
    ours, theirs = scratch / "ours.vmcore", scratch / "theirs.vmcore"
    r = livedump(*args, str(ours))
    assert r.returncode == 0, r.stderr
    vm.own_dump(theirs)
    assert first_difference(ours, theirs) is None
    # QEMU's class, byte order and machine (EM_386: the guest runs in real
    # mode), and its notes: NT_PRSTATUS and QEMU's own.
    assert identity(ours) == identity(theirs)
    assert identity(ours)[2] == "EM_386"
    assert [name for name, _ in identity(ours)[3]] == ["CORE", "QEMU"]
    vm.command("cont")
    assert_counts(vm)
    return report


@pytest.mark.parametrize("option", ["qmp-pretty", "mon-pretty"])
def test_pretty_printed_monitor(scratch, tmp_path, qemu, option):
    path = tmp_path / "qmp.sock"
    if option == "qmp-pretty":
        extra = ["-qmp-pretty", f"unix:{path},server=on,wait=off"]
    else:
        extra = ["-chardev", f"socket,id=pretty,path={path},server=on,wait=off",
                 "-mon", "chardev=pretty,mode=control,pretty=on"]
    with VM(memory="32M", platform=COUNTING_PC, livedump_socket=False, extra=extra,
            qemu=qemu) as vm:
        dumps_as_qemu(vm, scratch, "--qmp", str(path))


CONFIG = """# A QMP monitor, as -writeconfig would write it
[chardev "cfgqmp"]
  backend = "socket"
  path = "{path}"
  server = "on"
  wait = "off"

[mon]
  mode = "control"
  chardev = "cfgqmp"
"""


def test_monitor_in_a_readconfig_file(scratch, tmp_path, qemu):
    """Found from QEMU's PID alone; the file and the socket in it named relative
    to QEMU's working directory, as QEMU takes them."""
    (tmp_path / "vm.cfg").write_text(CONFIG.format(path="cfg.sock"))
    with contextlib.ExitStack() as stack:
        with contextlib.chdir(tmp_path):  # QEMU's working directory, not livedump's.
            vm = stack.enter_context(VM(memory="32M", platform=COUNTING_PC, qemu=qemu,
                                        livedump_socket=False, extra=["-readconfig", "vm.cfg"]))
        # The harness's monitor comes first and is held: it never greets.
        report = dumps_as_qemu(vm, scratch, "--pid", str(vm.pid), "--qmp-timeout", "5")
        assert report["detail"] == f"unix:{tmp_path}/cfg.sock"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_monitor(port: int) -> list[str]:
    return ["-chardev", f"socket,id=tcpqmp,host=127.0.0.1,port={port},server=on,wait=off",
            "-mon", "chardev=tcpqmp,mode=control"]


def _notes_dirs(pid: int) -> list[str]:
    """livedump's directories for QEMU's one-page dump, in the /tmp QEMU sees."""
    return glob.glob(f"/proc/{pid}/root/tmp/livedump-notes-*")


def _private_tmp(base: Path, qemu: Qemu) -> str:
    """``qemu``, seeing a /tmp of its own (as with systemd's PrivateTmp)."""
    wrapper = base / "qemu-private-tmp"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --mount --propagation private sh -c "
        "'mount -t tmpfs -o mode=1777 livedump-private-tmp /tmp && exec \"$@\"' "
        f"private-tmp {shlex.join(qemu.command())} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def _as_user(qemu: Qemu, user: str) -> list[str]:
    """The options that have ``qemu`` drop to ``user``: ``-runas`` until QEMU 10.0
    removed it for ``-run-with user=``, as its ``-help`` shows."""
    shown = subprocess.run([*qemu.command(), "-help"], capture_output=True, text=True).stdout
    return ["-runas", user] if "\n-runas " in shown else ["-run-with", f"user={user}"]


@pytest.mark.parametrize("qemu_as", ["us", "another-user", "private-tmp"])
def test_tcp_monitor_gets_qemus_cpu_notes(scratch, monkeypatch, qemu, qemu_as):
    """Over TCP no descriptor passes: QEMU's one-page dump goes to a private file,
    which is gone afterwards."""
    extra, started = _tcp_monitor(port := _free_port()), qemu
    if qemu_as != "us" and os.geteuid() != 0:
        pytest.skip("running QEMU as another user, or in a mount namespace, takes root")
    if qemu_as == "another-user":
        extra += _as_user(qemu, "nobody")
        scratch.chmod(0o1777)  # Where QEMU's own dump goes.
    elif qemu_as == "private-tmp":
        # The VM's sockets must be where QEMU sees them: not in /tmp.
        base = Path(tempfile.mkdtemp(prefix="livedump-test-", dir="/dev/shm"))
        monkeypatch.setattr(tempfile, "tempdir", str(base))
        started = _private_tmp(base, qemu)
    try:
        with VM(memory="32M", platform=COUNTING_PC, extra=extra, qemu=started) as vm:
            before = _notes_dirs(vm.pid)
            dumps_as_qemu(vm, scratch, "--qmp", f"tcp:127.0.0.1:{port}")
            assert _notes_dirs(vm.pid) == before
            if qemu_as == "private-tmp":  # Not in ours: QEMU's /tmp is not ours.
                assert os.stat(f"/proc/{vm.pid}/root/tmp").st_dev != os.stat("/tmp").st_dev
    finally:
        if qemu_as == "private-tmp":
            shutil.rmtree(base, ignore_errors=True)


# inotify(7), to catch the moment livedump's directory for QEMU's dump appears.
_libc = ctypes.CDLL(None, use_errno=True)
_IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")


def _created(fd: int, prefix: str, deadline: float) -> str | None:
    """The name of the next entry made whose name starts with ``prefix``."""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 65536)
        while data:
            _, _, _, size = _EVENT.unpack_from(data)
            name = data[_EVENT.size : _EVENT.size + size].rstrip(b"\0").decode()
            data = data[_EVENT.size + size :]
            if name.startswith(prefix):
                return name
    return None


def test_an_interrupt_while_qemu_writes_its_notes_leaves_no_file(scratch, qemu):
    """SIGTERM while the private file exists: no file left, the guest running."""
    with VM(memory="32M", platform=COUNTING_PC, extra=_tcp_monitor(port := _free_port()),
            qemu=qemu) as vm:
        watch = _libc.inotify_init1(os.O_CLOEXEC)
        assert watch >= 0 and _libc.inotify_add_watch(watch, b"/tmp", _IN_CREATE) >= 0
        try:
            for _attempt in range(20):
                dump = subprocess.Popen(
                    [sys.executable, "-m", "livedump", "--qmp", f"tcp:127.0.0.1:{port}",
                     str(scratch / "x.vmcore")], stderr=subprocess.PIPE)
                name = _created(watch, "livedump-notes-", time.monotonic() + 60)
                assert name is not None, dump.communicate(timeout=60)
                dump.send_signal(signal.SIGSTOP)  # Held while the directory is there...
                if not os.path.exists(f"/tmp/{name}"):
                    # Removed before the SIGSTOP came: let it finish, and once more.
                    dump.send_signal(signal.SIGCONT)
                    _, err = dump.communicate(timeout=120)
                    assert dump.returncode == 0, err
                    os.unlink(scratch / "x.vmcore")
                    continue
                dump.send_signal(signal.SIGTERM)
                dump.send_signal(signal.SIGCONT)  # ...and then told to end.
                _, err = dump.communicate(timeout=120)
                assert (dump.returncode, err) == (128 + signal.SIGTERM,
                                                  b"livedump: interrupted by SIGTERM\n")
                break
            else:
                pytest.fail("livedump's directory never lasted until a SIGSTOP")
        finally:
            os.close(watch)
        assert not os.path.exists(f"/tmp/{name}")
        assert os.listdir(scratch) == []
        assert_counts(vm)
