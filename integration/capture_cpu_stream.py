"""Record a background-snapshot stream of a halted long-mode guest with two vCPUs,
and QEMU's own one-page dump of the same guest, for the unit tests of the CPU
notes built from a stream (``tests/test_live_devices.py``).

The firmware halts with interrupts off, so its registers are the same at
the snapshot point and at the dump. QEMU is given as a binary or wrapper
(``integration.qemus``: an unpacked QEMU runs in its own namespace).

    python3 -m integration.capture_cpu_stream QEMU tests/data/live/qemu-10.0-long-mode
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

from .firmware import X86_64_LONG_MODE
from .vm import PC, VM


def capture(qemu: str, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stream, notes = directory / "stream.qevm", directory / "one-page.vmcore"
    with VM(qemu=qemu, memory="32M", platform=replace(PC, firmware=("-bios", X86_64_LONG_MODE)),
            extra=["-smp", "2"]) as vm:
        vm.wait_running(0.5)
        vm.command("dump-guest-memory", paging=False, protocol=f"file:{notes}", begin=0,
                   length=4096)
        vm.command("migrate-set-capabilities", capabilities=[
            {"capability": "background-snapshot", "state": True}])
        vm.command("migrate", uri=f"exec:cat > {stream}")
        while vm.command("query-migrate")["status"] not in ("completed", "failed"):
            time.sleep(0.05)
        assert vm.command("query-migrate")["status"] == "completed"
        (directory / "ramblock.txt").write_text(vm.hmp("info ramblock"))


if __name__ == "__main__":
    capture(sys.argv[1], Path(sys.argv[2]))
