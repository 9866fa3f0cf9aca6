"""The commands about the guest's kernel: ``livedump dmesg`` and ``livedump watch``."""

import argparse
import json
import os
import sys

from livedump import signals
from livedump.cli import add_vm_options, check_vm_options, epilog
from livedump.dmesg import Target, read_log
from livedump.errors import Interrupted, LivedumpError
from livedump.guest.printk import Record, format_record


def dmesg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livedump dmesg",
        description="Print the guest kernel's log, read from the running VM's memory: no "
        "vmcore, no vmlinux, the guest not paused (records are checked by their own "
        "states and sequence numbers). The text is makedumpfile --dump-dmesg's. Linux "
        "x86_64 and arm64 (little-endian) guests, with the printk ring buffer (5.10 on) "
        "or log_buf (3.5 to 5.9).",
        epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vm_options(p)
    p.add_argument("--pause", action="store_true", help="pause the guest while the log is "
                   "read, for an exact copy of it (as a dump pauses it)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print each new message as the guest logs it, until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object a line per message: "
                   "sequence, timestamp (seconds), timestamp_ns, level, facility, caller, text")
    p.add_argument("--caller", action="store_true", help="print the caller column "
                   "([T<pid>] or [C<cpu>]) as makedumpfile 1.7.5 and later do")
    return p


def vm_target(args: argparse.Namespace) -> Target:
    """The VM that :func:`livedump.cli.add_vm_options`' options name."""
    return Target(pid=args.pid, qmp=args.qmp, domain=args.domain, connect=args.connect,
                  via=args.via, debug_file=args.debug_file, qmp_timeout=args.qmp_timeout,
                  stall_timeout=args.stall_timeout)


def main(command: str, argv: list[str]) -> int:
    if command == "watch":
        from livedump.cli_watch import main as watch

        return watch(argv)
    p = dmesg_parser()
    args = p.parse_args(argv)
    check_vm_options(p, args)
    signals.install()
    target = vm_target(args)

    def emit(records: list[Record]) -> None:
        if args.json:
            text = "".join(json.dumps(r.as_json()) + "\n" for r in records)
        else:
            text = "".join(format_record(r, args.caller) for r in records)
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        read_log(target, args.pause, emit, follow=args.follow,
                 say=lambda text: print(f"livedump: {text}", file=sys.stderr, flush=True))
    except (LivedumpError, Interrupted) as e:
        print(f"livedump: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # The reader went away (| head): what it wanted was printed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
