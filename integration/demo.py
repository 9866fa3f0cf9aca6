"""Take a real vmcore: of your VM (--pid), or of a throwaway QEMU started here.

    python3 -m integration.demo [OUTPUT] [--pid PID]

Without --pid it boots a 2 GiB q35 guest (firmware only, KVM where usable),
places a marker in its RAM at 1.5 GiB, dumps it with livedump while it
runs, checks the marker in the vmcore with pyelftools, and stops the VM.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from .vm import VM, Marker, kvm_usable
from .vmcore import loads, read_phys

MARKER = Marker(0x6000_0000, b"Hello from guest-physical 0x60000000, says livedump's demo")


def run_livedump(pid: int, output: Path) -> None:
    cmd = [sys.executable, "-m", "livedump", "--pid", str(pid), "--force", str(output)]
    print("$", " ".join(["livedump", *cmd[3:]]), flush=True)
    subprocess.run(cmd, check=True)


def describe(output: Path) -> None:
    print(f"\n{output}: {output.stat().st_size} bytes, PT_LOAD segments:")
    for x in loads(output):
        print(f"  guest-physical {x.paddr:#014x}-{x.paddr + x.memsz - 1:#014x}  "
              f"({x.memsz >> 10} KiB) at file offset {x.offset:#x}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", nargs="?", default="demo.vmcore", type=Path)
    p.add_argument("--pid", type=int, help="dump this QEMU instead of starting one")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # Interleave with livedump's own report.
    if args.pid:
        run_livedump(args.pid, args.output)
        describe(args.output)
        return
    accel = "kvm" if kvm_usable() else "tcg"
    with VM(machine="q35", memory="2G", markers=[MARKER], accel=accel) as vm:
        print(f"started a throwaway QEMU (PID {vm.pid}, q35, 2 GiB, {accel}); "
              f"its state: {vm.status()}")
        vm.wait_running(1)
        run_livedump(vm.pid, args.output)
        print(f"the VM's state after the dump: {vm.status()}")
    describe(args.output)
    found = read_phys(args.output, MARKER.gpa, len(MARKER.data))
    print(f"\nat guest-physical {MARKER.gpa:#x} the vmcore holds: {found.decode()!r}")
    if found != MARKER.data:
        sys.exit("demo: the marker is not where it should be")


if __name__ == "__main__":
    main()
