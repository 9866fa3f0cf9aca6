"""Record a real background-snapshot migration stream for the unit tests in ``tests/``.

Starts a 32 MiB QEMU guest that halts at once (so its memory is known:
the firmware and the markers below), takes a background snapshot of it
into a file, and keeps the monitor's flat view of its memory and its list
of RAM blocks beside it.

    python3 -m integration.capture_stream tests/data/live
"""

import random
import sys
import time
from pathlib import Path

from .vm import HALTING_PC, VM, Marker

MEMORY = "32M"


def markers() -> list[Marker]:
    """Known bytes: text at 1 MiB, a page of seeded random bytes at the top of RAM."""
    rng = random.Random(7)
    return [
        Marker(0x10_0000, b"livedump stream marker at 1 MiB"),
        Marker(0x1FF_F000, bytes(rng.randrange(256) for _ in range(4096))),
    ]


def capture(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stream = directory / "stream.qevm"
    with VM(memory=MEMORY, platform=HALTING_PC, markers=markers()) as vm:
        vm.wait_running(0.5)
        for command, name in (("info mtree -f", "mtree.txt"), ("info ramblock", "ramblock.txt")):
            (directory / name).write_text(
                vm.command("human-monitor-command", **{"command-line": command}))
        vm.command("migrate-set-capabilities", capabilities=[
            {"capability": "background-snapshot", "state": True}])
        vm.command("migrate", uri=f"exec:cat > {stream}")
        while vm.command("query-migrate")["status"] not in ("completed", "failed"):
            time.sleep(0.05)
        assert vm.command("query-migrate")["status"] == "completed"


if __name__ == "__main__":
    capture(Path(sys.argv[1]))
