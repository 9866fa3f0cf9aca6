"""Memory devices dumped as QEMU dumps them: virtio-mem and NVDIMM, on each QEMU.

A virtio-mem device shows its whole backend in QEMU's memory map, but the
guest has only the blocks it plugged, and QEMU's ``dump-guest-memory``
takes those alone; an unplugged block may not exist on the host at all (a
shared memfd without reservation), and reading it would allocate it. An
NVDIMM's memory is shown through a non-volatile alias, yet QEMU dumps it.
Each vmcore is held to QEMU's own dump of the same paused VM (PT_LOADs,
every byte, ELF identity and notes), and QEMU's shared memory (RssShmem)
to what it was before the dump.
"""

import dataclasses
import gzip
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import linux_guest, qemus
from .conftest import livedump
from .counting import assert_counts
from .test_monitors import _free_port, _notes_dirs, _tcp_monitor
from .vm import COUNTING_PC, PC, VM
from .vmcore import first_difference, identity, loads, read_phys

QEMUS = qemus.available()
DEBUG = qemus.debug_builds()
needs_debug = pytest.mark.skipif(not DEBUG, reason="no QEMU with debug info: run "
                                 "integration/build-qemu-debug.sh [10.0]")


@pytest.fixture(params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each QEMU as one executable (QEMU 10.0 runs through a namespace of its own)."""
    wrapper = tmp_path / "qemu"
    wrapper.write_text("#!/bin/sh\nexec " + shlex.join(QEMUS[request.param].command())
                       + ' "$@"\n')
    wrapper.chmod(0o755)
    yield str(wrapper)


def rss_shmem(pid: int) -> int:
    """QEMU's resident shared memory, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/PID/status")


def virtio_mem(size: str, requested: str = "0") -> list[str]:
    """A virtio-mem device on an unreserved shared memfd: only what is plugged
    and written ever takes host memory."""
    return ["-object", f"memory-backend-memfd,id=vmem0,size={size},share=on,reserve=off",
            "-device", f"virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size={requested}"]


def plugged_in(vm: VM, vmcore: Path) -> int:
    """The bytes of the virtio-mem device's window that ``vmcore`` holds, after
    checking that QEMU says as much is plugged."""
    (device,) = [d["data"] for d in vm.command("query-memory-devices")
                 if d["type"] == "virtio-mem"]
    start, end = device["memaddr"], device["memaddr"] + device["max-size"]
    shown = sum(max(0, min(end, load.paddr + load.memsz) - max(start, load.paddr))
                for load in loads(vmcore))
    assert shown == device["size"]
    return shown


def segments(vmcore: Path) -> list[tuple[int, int, int]]:
    """Each PT_LOAD's guest-physical address and sizes."""
    return [(load.paddr, load.memsz, load.filesz) for load in loads(vmcore)]


def same_as_qemus_dump(vm: VM, scratch: Path, *args: str, grows: int = 1024) -> dict:
    """livedump ``args`` of the paused VM, then QEMU's own dump of it: the same
    PT_LOADs and bytes (and with CPU notes, the same identity, but for the
    VMCOREINFO livedump finds in a Linux guest's memory). QEMU's RssShmem
    grew by less than ``grows`` KiB meanwhile (QEMU's own dump may read
    more: an NVDIMM's holes). Its report."""
    ours, theirs = scratch / "ours.vmcore", scratch / "theirs.vmcore"
    before = rss_shmem(vm.pid)
    r = livedump("--pid", str(vm.pid), "--json", *args, str(ours))
    assert r.returncode == 0, r.stderr
    assert rss_shmem(vm.pid) - before < grows
    vm.own_dump(theirs)
    assert first_difference(ours, theirs) is None
    if "--no-pause" not in args:
        *header, found = identity(ours)
        assert (*header, [n for n in found if n[0] != "VMCOREINFO"]) == identity(theirs)
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", [[], ["--no-pause"]], ids=["pause", "no-pause"])
def test_unplugged_virtio_mem_is_left_out(scratch, qemu, mode):
    """Nothing plugged: not one byte of the device in the vmcore, nor in QEMU."""
    with VM(qemu=qemu, platform=COUNTING_PC, memory="256M,maxmem=4G",
            extra=virtio_mem("2G")) as vm:
        assert_counts(vm)
        before = rss_shmem(vm.pid)
        r = livedump("--pid", str(vm.pid), *mode, str(scratch / "running.vmcore"))
        assert r.returncode == 0, r.stderr
        assert_counts(vm)
        vm.command("stop")
        same_as_qemus_dump(vm, scratch, *mode)
        assert plugged_in(vm, scratch / "ours.vmcore") == 0
        assert rss_shmem(vm.pid) - before < 1024  # KiB: no backend page was made


def test_live_unplugged_virtio_mem(scratch, qemu):
    """--live: QEMU's snapshot never sends unplugged blocks, and none are expected."""
    with VM(qemu=qemu, platform=COUNTING_PC, memory="256M,maxmem=4G",
            extra=virtio_mem("2G")) as vm:
        assert_counts(vm)
        before = rss_shmem(vm.pid)
        ours, theirs = scratch / "ours.vmcore", scratch / "theirs.vmcore"
        r = livedump("--pid", str(vm.pid), "--live", "--json", str(ours))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["live"]
        assert_counts(vm)
        vm.command("stop")
        vm.own_dump(theirs)
        assert segments(ours) == segments(theirs)  # The count moved on: its bytes differ.
        assert identity(ours) == identity(theirs)
        assert rss_shmem(vm.pid) - before < 1024


NVDIMM_MACHINE = "pc,nvdimm=on"
NVDIMM_MARKER = b"livedump NVDIMM marker"


@pytest.mark.parametrize("mode", [[], ["--no-pause"], ["--live"]],
                         ids=["pause", "no-pause", "live"])
def test_nvdimm_is_dumped(scratch, qemu, mode):
    """An NVDIMM, shown through a non-volatile alias, is in QEMU's dump: in ours too."""
    backend = scratch / "nvdimm"
    with VM(qemu=qemu, platform=COUNTING_PC, machine=NVDIMM_MACHINE,
            memory="256M,slots=2,maxmem=1G", extra=[
                "-object", f"memory-backend-file,id=nv0,mem-path={backend},size=128M,share=on",
                "-device", "nvdimm,id=nv0dev,memdev=nv0"]) as vm:
        with open(backend, "r+b") as f:  # The file QEMU maps, shared: the guest sees it.
            f.write(NVDIMM_MARKER)
        assert_counts(vm)
        r = livedump("--pid", str(vm.pid), *mode, str(scratch / "running.vmcore"))
        assert r.returncode == 0, r.stderr
        assert_counts(vm)
        vm.command("stop")
        # Its holes are read (as QEMU's dump reads them) by the dump while running.
        same_as_qemus_dump(vm, scratch, *[m for m in mode if m != "--live"])
        addr = vm.command("query-memory-devices")[0]["data"]["addr"]
        assert any(load.paddr == addr and load.memsz == 128 << 20
                   for load in loads(scratch / "ours.vmcore"))
        assert read_phys(scratch / "ours.vmcore", addr, len(NVDIMM_MARKER)) == NVDIMM_MARKER


# --------------------------------------------------------------------------
# A partly plugged device: the Linux guest plugs blocks, QEMU says which
# --------------------------------------------------------------------------

# The modules virtio-mem needs over PCI in the guest kernel, in load order.
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                  "virtio_pci", "virtio_mem")
VMEM_READY = "LIVEDUMP-VMEM-READY"
# /init of an archive appended to the guest's initramfs (its busybox serves):
# load virtio-mem, then idle. Hot-plugged memory goes online movable, so the
# guest can unplug it again.
VMEM_INIT = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in {" ".join(VIRTIO_MODULES)}; do
    insmod /lib/vmem/$m.ko || echo "LIVEDUMP-GUEST-ERROR insmod $m failed"
done
echo {VMEM_READY}
while :; do sleep 1; done
"""


def virtio_mem_initrd(into: Path) -> Path:
    """The guest's initramfs with the virtio modules and :data:`VMEM_INIT` as
    /init appended (a later archive's files replace an earlier one's). The
    modules are taken from the kernel's package once, and cached."""
    root = linux_guest.cache_dir()
    _, base = linux_guest.guest_files()
    release = linux_guest.kernel_release()
    modules = root / "kernel" / "virtio-mem"
    if not (modules / "done").exists():
        with linux_guest._Locked(root):
            if not (modules / "done").exists():
                modules.mkdir(exist_ok=True)
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    deb = linux_guest._apt_get_download(f"linux-image-{release}", Path(tmp))
                    linux_guest._extract(deb, {
                        f"./lib/modules/{release}/kernel/drivers/virtio/{m}.ko": modules / f"{m}.ko"
                        for m in VIRTIO_MODULES})
                (modules / "done").write_text("")
    cpio = linux_guest._Cpio()
    cpio.directory("lib/vmem")
    for m in VIRTIO_MODULES:
        cpio.file(f"lib/vmem/{m}.ko", (modules / f"{m}.ko").read_bytes())
    cpio.file("init", VMEM_INIT.encode(), 0o755)
    initrd = into / "initrd-vmem.cpio.gz"
    initrd.write_bytes(base.read_bytes() + gzip.compress(cpio.finish(), mtime=0))
    return initrd


def linux_with_virtio_mem(qemu: str, into: Path, console: Path, *extra: str) -> VM:
    vmlinuz, _ = linux_guest.guest_files()
    return VM(qemu=qemu, platform=PC, machine="q35", memory="512M,maxmem=2G",
              command_timeout=linux_guest.SLOW_GUEST_COMMAND_TIMEOUT, extra=[
        "-kernel", str(vmlinuz), "-initrd", str(virtio_mem_initrd(into)),
        "-append", "console=ttyS0 panic=0 quiet memhp_default_state=online_movable",
        "-serial", f"file:{console}", "-no-reboot", *virtio_mem("1G"), *extra])


def plug(vm: VM, size: int, timeout: float = 120) -> None:
    """Ask the guest for ``size`` bytes plugged; wait until they are."""
    vm.command("qom-set", path="/machine/peripheral/vm0", property="requested-size", value=size)
    deadline = time.monotonic() + timeout
    while vm.command("qom-get", path="/machine/peripheral/vm0", property="size") != size:
        assert time.monotonic() < deadline, "the guest did not plug what was asked"
        time.sleep(0.2)


def test_partly_plugged_virtio_mem(scratch, qemu):
    """The guest plugs some blocks and unplugs some again: livedump dumps the
    blocks QEMU's dump does (from its program headers, inside the pause), and
    refuses --no-pause, which could not learn them without stopping the guest."""
    console = scratch / "console.log"
    port = _free_port()
    with linux_with_virtio_mem(qemu, scratch, console, *_tcp_monitor(port)) as vm:
        linux_guest.wait_for_console(console, VMEM_READY, 300, vm.process)
        plug(vm, 256 << 20)
        plug(vm, 96 << 20)
        r = livedump(*linux_guest.livedump_args(vm), "--no-pause",
                     str(scratch / "refused.vmcore"))
        assert r.returncode == 10 and b"virtio-mem device vm0" in r.stderr, r.stderr
        assert vm.status() == "running"
        live = scratch / "live.vmcore"
        r = livedump(*linux_guest.livedump_args(vm), "--live", "--json", str(live))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["live"] and vm.status() == "running"
        vm.command("stop")
        report = same_as_qemus_plugged(vm, scratch, *linux_guest.SLOW_GUEST_TIMEOUTS)
        assert report["cpu_notes"] == "CORE, QEMU notes from QEMU's dump-guest-memory"
        assert segments(live) == segments(scratch / "theirs.vmcore")
        # Over TCP no pipe passes: QEMU's dump goes into a FIFO of QEMU's /tmp, gone after.
        before = _notes_dirs(vm.pid)
        tcp = scratch / "tcp.vmcore"
        r = livedump("--qmp", f"tcp:127.0.0.1:{port}", *linux_guest.SLOW_GUEST_TIMEOUTS,
                     str(tcp))
        assert r.returncode == 0, r.stderr
        assert first_difference(tcp, scratch / "theirs.vmcore") is None
        assert _notes_dirs(vm.pid) == before


def same_as_qemus_plugged(vm: VM, scratch: Path, *args: str) -> dict:
    """:func:`same_as_qemus_dump` of the guest with 96 MiB plugged: plugged
    blocks the guest never wrote are read, as QEMU's dump reads them; not one
    unplugged block."""
    report = same_as_qemus_dump(vm, scratch, *args, grows=(96 << 10) + 1024)
    assert plugged_in(vm, scratch / "ours.vmcore") == 96 << 20
    return report


# --------------------------------------------------------------------------
# Ptrace mode: the same, from QEMU's own structures
# --------------------------------------------------------------------------

@needs_debug
@pytest.mark.parametrize("series", sorted(DEBUG))
def test_ptrace_unplugged_virtio_mem_and_nvdimm(scratch, series):
    """An unplugged virtio-mem device (its bitmap read through the region's
    discard manager) and an NVDIMM, through QEMU's DWARF."""
    backend = scratch / "nvdimm"
    with VM(qemu=str(DEBUG[series].binary), platform=COUNTING_PC, machine=NVDIMM_MACHINE,
            memory="256M,slots=2,maxmem=4G", livedump_socket=False, extra=[
                *virtio_mem("1G"),
                "-object", f"memory-backend-file,id=nv0,mem-path={backend},size=128M,share=on",
                "-device", "nvdimm,id=nv0dev,memdev=nv0"]) as vm:
        assert_counts(vm)
        r = livedump("--pid", str(vm.pid), "--via", "ptrace", str(scratch / "running.vmcore"))
        assert r.returncode == 0, r.stderr
        assert_counts(vm)
        vm.command("stop")
        same_as_qemus_dump(vm, scratch, "--via", "ptrace")
        assert plugged_in(vm, scratch / "ours.vmcore") == 0


@needs_debug
@pytest.mark.parametrize("series", sorted(DEBUG))
def test_ptrace_partly_plugged_virtio_mem(scratch, series):
    console = scratch / "console.log"
    with linux_with_virtio_mem(str(DEBUG[series].binary), scratch, console) as vm:
        linux_guest.wait_for_console(console, VMEM_READY, 300, vm.process)
        plug(vm, 256 << 20)
        plug(vm, 96 << 20)
        vm.command("stop")
        same_as_qemus_plugged(vm, scratch, "--via", "ptrace", *linux_guest.SLOW_GUEST_TIMEOUTS)


# --------------------------------------------------------------------------
# Through libvirt: the blocks from libvirt's own memory-only dump, cut short
# --------------------------------------------------------------------------

def test_libvirt_partly_plugged_virtio_mem(scratch):
    """libvirt's system QEMU: the blocks from libvirt's memory-only dump cut short;
    the vmcore equals ``virsh dump --memory-only``."""
    pytest.importorskip("libvirt", reason="libvirt's Python binding: pip install '.[libvirt]'")
    if shutil.which("libvirtd") is None or os.geteuid() != 0:
        pytest.skip("needs libvirtd (libvirt-daemon-system) and root")
    from .libvirt_harness import Domain, Libvirtd, readable_dir, virsh

    @dataclasses.dataclass
    class LinuxDomain(Domain):
        extra: list[str] = dataclasses.field(default_factory=list)

        def _xml(self, qemu_args: list[str]) -> str:
            return super()._xml([*qemu_args, *self.extra])

    files = readable_dir()
    try:
        vmlinuz, _ = linux_guest.guest_files()
        kernel, initrd = files / "vmlinuz", virtio_mem_initrd(files)
        shutil.copy(vmlinuz, kernel)
        console = files / "console.log"
        console.touch()
        for path in (kernel, initrd, console):
            path.chmod(0o666 if path == console else 0o644)
        # libvirt's own -m first, ours after: QEMU merges them, the last value winning.
        extra = ["-m", "512M,slots=2,maxmem=2G", "-kernel", str(kernel), "-initrd", str(initrd),
                 "-append", "console=ttyS0 panic=0 quiet memhp_default_state=online_movable",
                 "-serial", f"file:{console}", *virtio_mem("1G")]
        with Libvirtd(), LinuxDomain(files, extra=extra) as dom:
            linux_guest.wait_for_console(console, VMEM_READY, 300)
            qmp = LibvirtQmp(dom.name)
            plug(qmp, 256 << 20)  # type: ignore[arg-type]
            plug(qmp, 96 << 20)  # type: ignore[arg-type]
            virsh("suspend", dom.name)
            ours, theirs = scratch / "ours.vmcore", scratch / "theirs.vmcore"
            r = livedump("--domain", dom.name, *linux_guest.SLOW_GUEST_TIMEOUTS, "--json",
                         str(ours))
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["cpu_notes"] == "CORE, QEMU notes from libvirt's " \
                                                        "memory-only dump"
            virsh("dump", "--memory-only", dom.name, str(theirs))
            assert first_difference(ours, theirs) is None
            assert plugged_in(qmp, ours) == 96 << 20  # type: ignore[arg-type]
    finally:
        shutil.rmtree(files, ignore_errors=True)


class LibvirtQmp:
    """QMP commands to a libvirt domain's QEMU, through virsh qemu-monitor-command."""

    def __init__(self, name: str) -> None:
        self.name = name

    def command(self, name: str, **args: object) -> object:
        from .libvirt_harness import virsh

        reply = json.loads(virsh("qemu-monitor-command", self.name,
                                 json.dumps({"execute": name, "arguments": args})))
        return reply["return"]
