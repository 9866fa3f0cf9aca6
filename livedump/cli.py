"""The ``livedump`` command: parse arguments, run the dump, report, exit."""

import argparse
import json
import sys

from . import __version__, signals
from .arch import ARCHES
from .dump import Request, Summary, dump
from .errors import LivedumpError
from .monitor import Address
from .output import STDOUT

EPILOG = """\
exit codes: 0 done, 1 internal error, 2 usage, 3 no such process, 4 not QEMU,
5 no QMP monitor reachable, 6 permission denied, 7 output exists, 8 I/O error,
9 monitor refused or garbled, 10 RAM map unusable, 128+N killed by signal N
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="livedump",
        description="Write the guest memory of a running QEMU as an ELF vmcore "
        "(for crash, drgn, gdb), pausing the guest only while memory is copied.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help=f"vmcore to write, or {STDOUT} for standard output")
    p.add_argument("--pid", type=int, help="the QEMU process; its QMP monitors are "
                   "found on its command line")
    p.add_argument("--qmp", metavar="SOCKET", type=_qmp_address,
                   help="QMP monitor to use: a UNIX socket path, or tcp:HOST:PORT")
    p.add_argument("--arch", help="vmcore architecture (default: the QEMU target): "
                   + ", ".join(ARCHES))
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--qmp-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to wait for a monitor's greeting or reply (default 3)")
    p.add_argument("--json", action="store_true", help="report as JSON")
    p.add_argument("--version", action="version", version=f"livedump {__version__}")
    return p.parse_args(argv)


def _qmp_address(text: str) -> Address:
    if text.startswith("tcp:"):
        host, _, port = text[4:].rpartition(":")
        if not port.isdigit():
            raise argparse.ArgumentTypeError(f"bad TCP address {text!r}: want tcp:HOST:PORT")
        return (host.strip("[]") or "localhost", int(port))
    return text.removeprefix("unix:")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signals.install()
    request = Request(output=args.output, pid=args.pid, qmp=args.qmp, arch=args.arch,
                      force=args.force, qmp_timeout=args.qmp_timeout)
    try:
        summary = dump(request)
    except LivedumpError as e:
        print(f"livedump: {e}", file=sys.stderr)
        return e.exit_code
    report = sys.stderr if args.output == STDOUT else sys.stdout
    if args.json:
        print(json.dumps(as_json(summary)), file=report)
    else:
        print(f"livedump: {summary_line(summary)}", file=sys.stderr)
    return 0


def summary_line(s: Summary) -> str:
    paused = (f"guest paused {s.pause_seconds:.2f} s" if s.was_running
              else "guest was already paused")
    return (f"wrote {s.output}: {len(s.blocks)} blocks, {_size(s.memory_bytes)} of {s.arch} "
            f"guest memory in {s.wall_seconds:.2f} s, {paused}, via QMP {s.monitor}")


def as_json(s: Summary) -> dict[str, object]:
    return {
        "output": s.output, "pid": s.pid, "arch": s.arch, "elf_class": s.elf_class,
        "via": s.via, "monitor": s.monitor, "was_running": s.was_running,
        "blocks": [{"gpa": b.gpa, "size": b.size} for b in s.blocks],
        "memory_bytes": s.memory_bytes, "file_bytes": s.file_size,
        "wall_seconds": round(s.wall_seconds, 6), "pause_seconds": round(s.pause_seconds, 6),
    }


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} GiB"
