"""The ``livedump`` command: parse arguments, run the dump, report, exit."""

import argparse
import json
import sys
from typing import TYPE_CHECKING, NoReturn

from livedump import __version__, signals
from livedump.dump import Request, Summary, dump
from livedump.vm.guardian import STALL_TIMEOUT
from livedump.vm.session import VIAS
from livedump.vmcore.arch import ARCHES
from livedump.vmcore.arch import lookup as arch_lookup
from livedump.vmcore.kdump import COMPRESSIONS, DEFAULT_COMPRESSION

if TYPE_CHECKING:
    pass

from livedump.errors import Interrupted, LivedumpError, exit_codes
from livedump.transfer.output import (
    STDOUT,
    check_stdout,
    guard_standard_fds,
    open_to_others,
)
from livedump.vm.process import Address, tcp_address

# Commands besides the dump, recognized as the first argument only.
SUBCOMMANDS = ("dmesg", "watch")


def epilog() -> str:
    """The exit codes, from errors.py, where each is defined once."""
    codes = [f"  {code:>3}  {meaning}" for code, meaning in exit_codes()]
    return "\n".join(["exit codes:", *codes,
                      "  128+N  killed by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP)"])


def add_vm_options(p: argparse.ArgumentParser) -> None:
    """The options that name the VM and say how to reach it: the same for every command."""
    p.add_argument("--pid", type=int, help="the QEMU process; its QMP monitors are "
                   "found on its command line")
    p.add_argument("--qmp", metavar="SOCKET", type=_qmp_address,
                   help="QMP monitor to use: a UNIX socket path, or tcp:HOST:PORT")
    p.add_argument("--domain", metavar="NAME", help="the libvirt domain: paused and "
                   "mapped through libvirt (which then marks it tainted: custom-monitor), "
                   "or with --via ptrace only located by libvirt")
    p.add_argument("--connect", metavar="URI", help="libvirt URI for --domain (default: "
                   "$LIBVIRT_DEFAULT_URI, else qemu:///system)")
    p.add_argument("--core", metavar="CORE",
                   help="a core file of a QEMU process (plain, or zstd-compressed as "
                   "systemd-coredump keeps them): the vmcore of its guest, mapped through "
                   "QEMU's debug info as --via ptrace does; QEMU must have run with "
                   "dump-guest-core=on (its default)")
    p.add_argument("--via", choices=VIAS, default="auto",
                   help="qmp: pause and map the VM through its monitor; ptrace: freeze "
                   "QEMU's threads and map its RAM from its debug info (no monitor needed); "
                   "auto (default): qmp if a monitor answers, else ptrace")
    p.add_argument("--debug-file", metavar="PATH",
                   help="QEMU's debug info for --via ptrace or --core (default: found by build-id, "
                   ".gnu_debuglink or debuginfod)")
    p.add_argument("--qmp-timeout", type=_seconds, default=3.0, metavar="SECONDS",
                   help="how long to wait for a monitor's greeting or reply (default 3)")
    p.add_argument("--stall-timeout", type=_seconds, default=STALL_TIMEOUT, metavar="SECONDS",
                   help="while livedump holds the VM (paused, frozen, or a --live snapshot "
                   "only it reads), how long it may make no progress (stopped, or its output "
                   "not read) before its guardian kills it and lets the VM go "
                   f"(default {STALL_TIMEOUT:g})")


def check_vm_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.domain is not None and (args.pid is not None or args.qmp is not None):
        p.error("--domain names the VM: not with --pid or --qmp")
    if args.connect is not None and args.domain is None:
        p.error("--connect needs --domain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="livedump",
        description="Write the guest memory of a running QEMU as an ELF vmcore "
        "(for crash, drgn, gdb), pausing the guest only while memory is copied. "
        "Also: 'livedump dmesg' (the guest kernel's log) and 'livedump watch' (a vmcore "
        "when the guest panics); see 'livedump dmesg --help'.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help=f"vmcore to write, or {STDOUT} for standard output "
                   f"(a file named like a command, {' or '.join(SUBCOMMANDS)}: ./NAME)")
    add_vm_options(p)
    p.add_argument("--arch", type=_arch, help="vmcore architecture (default: as QEMU "
                   "judges the CPU state; with --no-pause on a running guest, what the QEMU "
                   "target and CPU model imply; one the target cannot be is written with "
                   "a warning): " + ", ".join(ARCHES))
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true",
                      help="consistent vmcore with the guest paused only for milliseconds: "
                      "QEMU (6.0 or newer) takes a background snapshot and livedump reads "
                      "it while the guest runs (needs the QMP monitor, and an output file "
                      "but with --format kdump). With -d N or --format kdump the snapshot is "
                      "first spooled into an unnamed file beside the output (in TMPDIR for "
                      "standard output), which takes as much disk as the ELF vmcore would")
    mode.add_argument("--no-pause", dest="pause", action="store_false",
                      help="do not pause the guest: faster for it, but the vmcore is fuzzy "
                      "(memory changes while it is read)")
    p.add_argument("--format", choices=("elf", "kdump"), default="elf",
                   help="elf (default): an ELF vmcore, every page of guest RAM; kdump: "
                   "makedumpfile's kdump-compressed format (x86_64 guests), pages compressed "
                   "one by one, flattened when written to standard output "
                   "(makedumpfile -R restores the file; drgn reads either)")
    p.add_argument("--compress", choices=COMPRESSIONS, default=None,
                   help=f"page compression of --format kdump (default {DEFAULT_COMPRESSION})")
    p.add_argument("-d", "--dump-level", type=int, default=0, metavar="N",
                   help="makedumpfile's dump level, the sum of the page classes left out: "
                   "1 zero pages, 2 page cache, 4 cache with private data, 8 user data, "
                   "16 free pages (31: all), decided from the guest kernel's struct page "
                   "array (x86_64; what cannot be decided is kept, with a warning). With "
                   "--format elf the pages are left out of the PT_LOADs, as makedumpfile "
                   "-E does (zero pages are holes in the file anyway)")
    p.add_argument("--json", action="store_true", help="report as JSON")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no summary line (errors are still reported)")
    p.add_argument("--allow-readable-by-others", action="store_true",
                   help="write the vmcore even where its filesystem lets others read it "
                   "(vfat or exfat mounted without umask=077 decides the mode); refused "
                   "otherwise, as guest memory holds secrets")
    p.add_argument("--version", action="version", version=f"livedump {__version__}")
    args = p.parse_args(argv)
    check_vm_options(p, args)
    if args.output in SUBCOMMANDS:
        # "livedump --pid 1 dmesg" meant the log, not a vmcore of that name.
        p.error(f"{args.output!r} is a command: give it first (livedump {args.output} "
                f"--pid PID ...); to write a vmcore of that name, say ./{args.output}")
    if args.core is not None and (args.pid is not None or args.qmp is not None
                                  or args.domain is not None):
        p.error("--core names a core file, not a VM: not with --pid, --qmp or --domain")
    if args.core is not None and (args.live or not args.pause or args.via != "auto"):
        p.error("--core reads a core file: --live, --no-pause and --via do not apply")
    return args


def _arch(text: str) -> str:
    try:
        return arch_lookup(text).name
    except LivedumpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _qmp_address(text: str) -> Address:
    if text.startswith("tcp:"):
        if (address := tcp_address(text)) is None:
            raise argparse.ArgumentTypeError(f"bad TCP address {text!r}: want tcp:HOST:PORT")
        return address
    return text.removeprefix("unix:")


def main(argv: list[str] | None = None) -> int:
    guard_standard_fds()  # Already done by ``python -m livedump``; not by the script.
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        from livedump import cli_guest

        return cli_guest.main(argv[0], argv[1:])
    args = parse_args(argv)
    signals.install()
    request = Request(output=args.output, pid=args.pid, qmp=args.qmp, domain=args.domain,
                      connect=args.connect, via=args.via,
                      debug_file=args.debug_file, arch=args.arch,
                      force=args.force, qmp_timeout=args.qmp_timeout, pause=args.pause,
                      live=args.live, stall_timeout=args.stall_timeout,
                      format=args.format, compress=args.compress, dump_level=args.dump_level,
                      allow_readable_by_others=args.allow_readable_by_others,
                      core=args.core,
                      progress=None if args.quiet or not sys.stderr.isatty() else ProgressBar())
    try:
        if args.output == STDOUT:
            check_stdout()  # Before the VM is looked at.
        summary = dump(request)
    except (LivedumpError, Interrupted) as e:
        print(f"livedump: {e}", file=sys.stderr)
        return e.exit_code
    report = sys.stderr if args.output == STDOUT else sys.stdout
    for warning in summary.warnings:  # Even with --quiet: the vmcore is not what it seems.
        print(f"livedump: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(as_json(summary)), file=report)
    elif not args.quiet:
        print(f"livedump: {summary_line(summary)}", file=sys.stderr)
    return 0


class ProgressBar:
    """A progress bar on the terminal, with rate and time left."""

    def __init__(self) -> None:
        # Imported only where there is a terminal to show it (the import is
        # slow next to a small dump), and before the guest is paused.
        import tqdm

        self._tqdm = tqdm.tqdm
        # No monitor thread: signals must reach only the main thread.
        self._tqdm.monitor_interval = 0
        self._bar: tqdm.tqdm[NoReturn] | None = None  # a bar over no iterable

    def start(self, total: int) -> None:
        self._bar = self._tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                         desc="livedump", leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def summary_line(s: Summary) -> str:
    if s.via == "core":
        paused = "from a core file"
    elif not s.was_running:
        paused = "guest was already paused"
    elif s.live:
        paused = (f"guest paused {s.pause_seconds:.3f} s (live: memory from QEMU's "
                  "background snapshot, read while the guest ran)")
    elif s.paused:
        paused = (f"QEMU frozen {s.pause_seconds:.3f} s" if s.via == "ptrace"
                  else f"guest paused {s.pause_seconds:.3f} s")
    else:
        paused = "guest NOT paused (--no-pause): memory may be inconsistent"
    return (f"wrote {s.output}: {len(s.blocks)} blocks, {_size(s.memory_bytes)} of {s.arch} "
            f"guest memory ({_size(s.read_bytes)} read, {_size(s.written_bytes)} written, "
            f"the rest never touched or zero) in {s.wall_seconds:.2f} s, {paused}, "
            f"{_via(s)}; {s.cpu_notes}; architecture: {s.arch_from}; "
            f"{s.vmcoreinfo.detail}{_kdump(s)}{_exposed(s)}")


def _kdump(s: Summary) -> str:
    """What a kdump file holds: pages kept and left out, and the compression."""
    k = s.kdump
    if k is None:
        if s.pages is None:
            return ""
        left = s.pages["excluded_pages"]
        assert isinstance(left, dict)
        return (f"; dump level {s.pages['dump_level']}: pages left out: "
                + (", ".join(f"{n} {c}" for c, n in left.items()) or "none") + _spool(s.pages))
    excluded = k["excluded_pages"]
    assert isinstance(excluded, dict)
    out = ", ".join(f"{n} {c}" for c, n in excluded.items()) or "none"
    return (f"; kdump, dump level {k['dump_level']}, {k['compression']}: {k['kept_pages']} "
            f"of {k['ram_pages']} pages kept ({k['zero_pages']} of them as the page of "
            f"zeros), pages left out: {out}; {_size(int(str(k['bytes_before_compression'])))} "
            f"of pages in {_size(int(str(k['bytes_after_compression'])))}{_spool(k)}")


def _spool(report: dict[str, object]) -> str:
    """The disk a --live snapshot's spool took while the file was made from it."""
    spooled = report.get("spool_bytes")
    return "" if spooled is None else (f"; from the snapshot spooled in {_size(int(str(spooled)))} "
                                       "of its filesystem (now freed)")


def _exposed(s: Summary) -> str:
    """A warning, where the file's filesystem lets others read it (asked for)."""
    if s.file_mode is None or not open_to_others(s.file_mode):
        return ""
    return f"; {s.output} is readable by others (mode {s.file_mode:04o}, set by its filesystem)"


def as_json(s: Summary) -> dict[str, object]:
    return {
        "output": s.output, "pid": s.pid, "arch": s.arch, "arch_from": s.arch_from,
        "elf_class": s.elf_class, "qemu_target": s.qemu_target, "warnings": s.warnings,
        "via": s.via, "detail": s.detail, "was_running": s.was_running,
        "paused": s.paused, "live": s.live, "read_bytes": s.read_bytes,
        "written_bytes": s.written_bytes,
        "cpu_notes": s.cpu_notes, "vmcoreinfo": s.vmcoreinfo.as_json(),
        # Where each block lies in QEMU too (host virtual address), for a look with other tools.
        "blocks": [{"gpa": b.gpa, "size": b.size, "hva": b.hva} for b in s.blocks],
        "memory_bytes": s.memory_bytes, "file_bytes": s.file_size,
        "file_mode": None if s.file_mode is None else f"{s.file_mode:04o}",
        "wall_seconds": round(s.wall_seconds, 6), "pause_seconds": round(s.pause_seconds, 6),
        "format": s.format, "kdump": s.kdump, "pages": s.pages,
    }


def _via(s: Summary) -> str:
    if s.via == "qmp":
        return f"via QMP {s.detail}"
    if s.via == "libvirt":
        return f"via libvirt: {s.detail}"
    if s.via == "core":
        return f"from the core {s.detail}"
    return f"via ptrace and QEMU's debug info ({s.detail})"


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} GiB"
