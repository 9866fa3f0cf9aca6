"""How long ``--live`` pauses the guest, by QEMU's STOP and RESUME events, on each QEMU.

A 1 GiB guest with half its RAM random bytes (loaded at power-on), a new
one for every run. For each QEMU here: QEMU's background snapshot by itself
(``migrate`` into a pipe that discards, from the harness's monitor), then
``livedump --live`` from each source tree given (the current one by
default; an older one, exported with ``git archive``, to compare with).
Prints the median of the runs and all of them.

    python -m integration.bench_live_pause [--runs 3] [--tree DIR ...]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import qemus
from .bench import pause_from_events
from .vm import PC, VM

HALF = 512 << 20


def blob(workdir: Path) -> Path:
    path = workdir / "random-512m.bin"
    if not path.exists():
        with open(path, "wb") as f:
            for _ in range(HALF >> 20):
                f.write(os.urandom(1 << 20))
    return path


def guest(qemu: str, workdir: Path) -> VM:
    return VM(qemu=qemu, platform=PC, memory="1G",
              extra=["-device", f"loader,file={blob(workdir)},addr={HALF:#x},force-raw=on"])


def qemu_alone(vm: VM) -> float:
    vm.command("migrate-set-capabilities", capabilities=[
        {"capability": "background-snapshot", "state": True}])
    vm.event_log()
    vm.command("migrate", uri="exec:cat > /dev/null")
    while vm.command("query-migrate")["status"] not in ("completed", "failed"):
        time.sleep(0.05)
    return pause_from_events(vm)


def livedump(tree: Path, out: Path):
    def run(vm: VM) -> float:
        vm.event_log()
        subprocess.run([sys.executable, "-m", "livedump", "--pid", str(vm.pid), "--live",
                        "--quiet", "--force", str(out)], cwd=tree, check=True)
        out.unlink()
        return pause_from_events(vm)
    return run


def wrapper(qemu: qemus.Qemu, workdir: Path, series: str) -> str:
    path = workdir / f"qemu-{series}"
    path.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in qemu.command()) + ' "$@"\n')
    path.chmod(0o755)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tree", type=Path, action="append",
                   help="a livedump source tree (default: this one)")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = p.parse_args()
    trees = args.tree or [Path(__file__).resolve().parents[1]]
    with tempfile.TemporaryDirectory(prefix="livedump-pause-", dir=args.dir) as tmp:
        work = Path(tmp)
        for series, qemu in qemus.available().items():
            binary = wrapper(qemu, work, series)
            ways = [("QEMU's snapshot alone", qemu_alone)] + [
                (f"livedump --live ({tree})", livedump(tree, work / "out.vmcore"))
                for tree in trees]
            for name, way in ways:
                pauses = []
                for _ in range(args.runs):
                    with guest(binary, work) as vm:
                        vm.wait_running(1)
                        pauses.append(way(vm))
                print(f"QEMU {series:5} {name:60} median {statistics.median(pauses) * 1e3:7.1f} ms"
                      f"  ({', '.join(f'{p * 1e3:.1f}' for p in pauses)})", flush=True)


if __name__ == "__main__":
    main()
