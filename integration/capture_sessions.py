"""Record real monitor sessions for the unit tests in ``tests/``.

For each VM configuration this starts a real QEMU, pauses it, and records
every monitor exchange livedump's RAM locator makes, plus the PT_LOAD list
of QEMU's own ``dump-guest-memory`` of the same paused VM. The unit tests
replay the exchanges and must arrive at QEMU's PT_LOAD list. QEMU's dump of
the VM's first page is kept too (``NAME-one-page.vmcore``): the notes and
ELF identity livedump takes from QEMU.

    python3 -m integration.capture_sessions tests/data/sessions [CONFIG...]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from livedump.qmp import ram_map as locate
from livedump.qmp.monitor import Monitor
from livedump.qmp.transport import QMPTransport

from .firmware_more import MORE_ARCH_PLATFORMS
from .vm import ARCH_PLATFORMS, VM, kvm_usable
from .vmcore import loads

CONFIGS = {
    "pc-1G-prelaunch": dict(machine="pc", memory="1G", start_paused=True),
    "pc-1G-seabios": dict(machine="pc", memory="1G"),
    "q35-5G-seabios": dict(machine="q35", memory="5G"),
    "q35-5G-seabios-kvm": dict(machine="q35", memory="5G", accel="kvm"),
    # The other machines of integration/test_arches.py, firmware idling.
    "pc-i386-512M-pflash": dict(platform=ARCH_PLATFORMS["386-elf32"], memory="512M"),
    "virt-aarch64-512M": dict(platform=ARCH_PLATFORMS["aarch64-be"], memory="512M"),
    "pseries-512M": dict(platform=ARCH_PLATFORMS["ppc64-be"], memory="512M"),
    "powernv9-1G": dict(platform=ARCH_PLATFORMS["ppc64-le"], memory="1G"),
    "s390-ccw-virtio-512M": dict(platform=ARCH_PLATFORMS["s390"], memory="512M"),
    "virt-arm-256M": dict(platform=MORE_ARCH_PLATFORMS["arm-be"], memory="256M"),
    "virt-aarch64-cortex-a15-256M": dict(platform=MORE_ARCH_PLATFORMS["arm-le-on-aarch64"],
                                         memory="256M"),
    "virt-riscv64-256M": dict(platform=MORE_ARCH_PLATFORMS["riscv64"], memory="256M"),
    "virt-riscv32-256M": dict(platform=MORE_ARCH_PLATFORMS["riscv32"], memory="256M"),
    "g3beige-256M": dict(platform=MORE_ARCH_PLATFORMS["ppc-le"], memory="256M"),
}


class Recorder:
    """A transport that passes commands through and keeps every exchange."""

    def __init__(self, inner: QMPTransport) -> None:
        self.inner = inner
        self.exchanges: list[dict] = []

    def execute(self, command, arguments=None, timeout=None):
        reply = self.inner.execute(command, arguments, timeout)
        self.exchanges.append({"execute": command, "arguments": arguments, "return": reply})
        return reply

    def close(self):
        self.inner.close()


def capture(name: str, config: dict) -> tuple[dict, bytes]:
    with VM(**config) as vm, tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        if vm.status() == "running":
            vm.wait_running(1)
            vm.command("stop")
        recorder = Recorder(QMPTransport(str(vm.socket), 5))
        try:
            monitor = Monitor(recorder)
            locate.guest_ranges(monitor, locate.flat_view(monitor))
            monitor.ram_blocks()  # what the map is checked against
        finally:
            recorder.close()
        core, page = Path(tmp) / "qemu.vmcore", Path(tmp) / "page.vmcore"
        vm.own_dump(core)
        first = loads(core)[0].paddr
        vm.own_dump(page, begin=first, length=4096)
        version = subprocess.run([vm.args[0], "--version"], capture_output=True, text=True)
        return {
            "config": name,
            "qemu": version.stdout.splitlines()[0],
            "exchanges": recorder.exchanges,
            "qemu_dump_loads": [[x.paddr, x.memsz] for x in loads(core)],
        }, page.read_bytes()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:] or CONFIGS:
        config = CONFIGS[name]
        if config.get("accel") == "kvm" and not kvm_usable():
            continue
        session, page = capture(name, config)
        (out / f"{name}.json").write_text(json.dumps(session, indent=1) + "\n")
        (out / f"{name}-one-page.vmcore").write_bytes(page)
        print(name)


if __name__ == "__main__":
    main()
