"""The monitor must be QEMU itself, and what it says must fit QEMU.

A relay between livedump and QEMU could answer anything: where guest RAM
is (and livedump would write QEMU's heap as the guest's), or that the
guest is paused. So a monitor whose peer is not the QEMU process is
refused before a command is sent; and a relay that passes as QEMU (see
integration/qmp_proxy.py) and lies about the map or the pause is caught by
the checks against QEMU's own RAM blocks, mappings and run state. In every
case the VM runs on untouched and no file is left.
"""

import json
import os
import re
import socket

import pytest

from .conftest import livedump
from .qmp_proxy import QMPProxy
from .vm import VM


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("with_pid", [True, False], ids=["pid", "no-pid"])
def test_a_relay_is_refused(scratch, tcp, with_pid):
    with VM(memory="128M") as vm, QMPProxy(vm.socket, as_qemu=False, tcp=tcp) as proxy:
        vm.events()
        pid = ["--pid", str(vm.pid)] if with_pid else []
        r = livedump(*pid, "--qmp", proxy.qmp, str(scratch / "x.vmcore"))
        where = proxy.qmp if tcp else f"unix:{proxy.qmp}"
        wanted = f"QEMU PID {vm.pid}" if with_pid else "QEMU"
        assert r.returncode == 4, r.stderr
        assert re.fullmatch(
            rf"livedump: {re.escape(where)} is served by PID {os.getpid()} \(.*python.*\), "
            rf"not by {wanted}: livedump talks only to QEMU's own monitor\n",
            r.stderr.decode()), r.stderr
        # Not a command reached QEMU; over UNIX, not a word was read from the relay.
        assert [m["execute"] for m in proxy.sent] == (["qmp_capabilities"] if tcp else [])
        assert vm.events() == []
        assert vm.status() == "running"
        assert os.listdir(scratch) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_monitor_alone_finds_qemu(scratch, qemu, host):
    """``--qmp tcp:HOST:PORT`` with no --pid: QEMU is the process holding the other end."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:  # A free port, for QEMU to listen on.
        s.bind((host, 0))
        port = s.getsockname()[1]
    address = f"[{host}]" if ":" in host else host
    with VM(memory="128M", livedump_socket=False, qemu=qemu, extra=[
            "-chardev", f"socket,id=tcpqmp,host={host},port={port},server=on,wait=off",
            "-mon", "chardev=tcpqmp,mode=control"]) as vm:
        out = scratch / "x.vmcore"
        r = livedump("--json", "--qmp", f"tcp:{address}:{port}", str(out))
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert (report["pid"], report["via"]) == (vm.pid, "qmp")
        assert out.stat().st_size > 128 << 20
        assert vm.status() == "running"


def _heap(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return next(int(line.split("-")[0], 16) for line in f if line.rstrip().endswith("[heap]"))


def _onto_heap(heap: int):
    """A relay's lie: the BIOS (256 KiB of RAM to QEMU) is in QEMU's heap."""
    def rewrite(request: dict, reply: dict) -> dict:
        line = request.get("arguments", {}).get("command-line", "")
        if line.startswith("gpa2hva ") and "(pc.bios)" in reply["return"]:
            reply["return"] = f"Host virtual address for {line[8:]} (pc.bios) is {heap:#x}\r\n"
        return reply
    return rewrite


def _same_mib_1024_times(request: dict, reply: dict) -> dict:
    """A relay's lie: the flat view shows pc.ram's first MiB at 1,024 guest
    addresses, and gpa2hva agrees (128 MiB of RAM would give a 1 GiB file)."""
    line = request.get("arguments", {}).get("command-line", "")
    if line == "info mtree -f":
        lines = [f"  {i << 20:016x}-{(i + 1 << 20) - 1:016x} (prio 0, ram): pc.ram"
                 for i in range(1024)]
        reply["return"] = ('FlatView #0\r\n AS "memory", root: system\r\n'
                           " Root memory region: system\r\n" + "\r\n".join(lines) + "\r\n\r\n")
    elif line == "gpa2hva 0x0":  # QEMU's true answer: where pc.ram starts.
        _same_mib_1024_times.base = reply["return"].split()[-1]  # type: ignore[attr-defined]
    elif line.startswith("gpa2hva "):
        reply["return"] = (f"Host virtual address for {line[8:]} (pc.ram) is "
                           f"{_same_mib_1024_times.base}\r\n")  # type: ignore[attr-defined]
    return reply


@pytest.mark.parametrize("lie, message", [
    ("heap", r"QEMU's RAM block 'pc.bios' would be at 0x[0-9a-f]+, in \[heap\]: not guest RAM"),
    ("1024", r"memory region 'pc.ram': its bytes at offset 0x0 are shown at 3 guest "
             r"addresses or more \(QEMU shows RAM at 2 at most\)"),
])
def test_a_map_that_does_not_fit_qemu_is_refused(scratch, qemu, lie, message):
    """Even from a relay that passes for QEMU: refused before the guest is paused."""
    if lie == "heap" and qemu.version >= (8, 0):
        # 'info ramblock' shows where each block lies in QEMU: the lie is
        # caught against that before the mappings are looked at.
        message = (r"memory region 'pc.bios' would start at 0x[0-9a-f]+ in QEMU, where "
                   r"QEMU has no RAM block of that name")
    with VM(memory="128M", qemu=qemu) as vm:
        rewrite = _onto_heap(_heap(vm.pid)) if lie == "heap" else _same_mib_1024_times
        with QMPProxy(vm.socket, rewrite=rewrite) as proxy:
            vm.events()
            r = livedump("--pid", str(vm.pid), "--qmp", proxy.qmp, str(scratch / "x.vmcore"))
            assert r.returncode == 10, r.stderr
            assert re.fullmatch(f"livedump: {message}\n", r.stderr.decode()), r.stderr
            assert "stop" not in [m["execute"] for m in proxy.sent]
            assert vm.events() == []
            assert vm.status() == "running"
            assert os.listdir(scratch) == []


def test_a_stop_that_does_not_pause_is_refused(scratch, qemu):
    """A relay that answers 'stop' itself, passing it on to no one."""
    def answer(request: dict) -> dict | None:
        return {"return": {}} if request.get("execute") == "stop" else None

    with VM(memory="128M", qemu=qemu) as vm, QMPProxy(vm.socket, answer=answer) as proxy:
        vm.events()
        r = livedump("--pid", str(vm.pid), "--qmp", proxy.qmp, str(scratch / "x.vmcore"))
        assert r.returncode == 9, r.stderr
        assert r.stderr == b"livedump: the monitor answered 'stop', but the guest still runs\n"
        assert "STOP" not in vm.events()
        assert vm.status() == "running"
        assert os.listdir(scratch) == []
