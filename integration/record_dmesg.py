"""Record what ``livedump dmesg`` reads of a real Linux guest, for the unit tests.

Boots the test guest (with ``livedump.kmsg``, so the log holds awkward
messages), pauses it, and saves into ``tests/data/dmesg/NAME.*``:

* ``.vmcoreinfo``: the kernel's VMCOREINFO text;
* ``.reads.gz``: every guest-physical read a full read of the log made
  (page tables included), as records of ``<gpa u64><length u32><bytes>``;
* ``.makedumpfile.txt``: ``makedumpfile --dump-dmesg`` of livedump's vmcore of
  the same paused guest, which the unit tests compare with.

Run ``python -m integration.record_dmesg`` from the repository.
"""

import argparse
import gzip
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livedump.dmesg import Guest
from livedump.guest.kernel import Kernel
from livedump.guest.printk import open_log
from livedump.qmp.session import connect_monitor

from .linux_guest import LinuxVM, kernel_release

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "dmesg"


def record(name: str) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    with LinuxVM(machine="q35", memory="512M", cmdline_extra=["livedump.kmsg=1"]) as vm:
        vm.wait_idle(timeout=600)
        time.sleep(3)  # a few LIVEDUMP-KMSG lines (the quiet console does not show them)
        vm.command("stop")
        session = connect_monitor(vm.pid, None, 3.0, 60.0)
        guest = Guest(session)
        reads: list[tuple[int, bytes]] = []

        def read_phys(gpa: int, length: int) -> bytes | None:
            data = guest.guest.read(gpa, length)
            if data is not None:
                reads.append((gpa, data))
            return data

        kernel = Kernel(guest.kernel.entries, guest.arch, read_phys)
        open_log(kernel).records()
        guest.close()
        session.close()
        text = "".join(f"{k}={v}\n" for k, v in guest.kernel.entries.items())
        (DATA / f"{name}.vmcoreinfo").write_text(text)
        raw = b"".join(struct.pack("<QI", gpa, len(data)) + data for gpa, data in reads)
        (DATA / f"{name}.reads.gz").write_bytes(gzip.compress(raw, 9, mtime=0))
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            vmcore = Path(tmp) / "guest.vmcore"
            subprocess.run([sys.executable, "-m", "livedump", "-q", "--pid", str(vm.pid),
                            str(vmcore)], check=True)
            subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore),
                            str(DATA / f"{name}.makedumpfile.txt")], check=True,
                           capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="file name stem (default: linux-RELEASE)")
    args = parser.parse_args()
    record(args.name or f"linux-{kernel_release()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
