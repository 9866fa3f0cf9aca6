"""``livedump watch``: a vmcore into DIR whenever the guest panics."""

import argparse
import json
import sys
from pathlib import Path

from livedump import signals
from livedump.cli import add_vm_options, as_json, check_vm_options, epilog, summary_line
from livedump.cli_guest import vm_target
from livedump.dump import Request
from livedump.errors import Interrupted, LivedumpError
from livedump.watch import Taken, watch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livedump watch",
        description="Wait, at next to no cost, for the guest to die, and write a vmcore "
        "into DIR when it does: on QEMU's GUEST_PANICKED event (a pvpanic device), or "
        "when a panic, oops, hung-task or lockup report appears in the guest kernel's "
        "log. Says what triggered it, leaves the VM as it was, and goes on watching.",
        epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", metavar="DIR", type=Path,
                   help="where vmcores go, named for the VM and the time (UTC)")
    add_vm_options(p)
    p.add_argument("--once", action="store_true", help="stop after one vmcore")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="as for a dump: the guest paused "
                      "only for milliseconds (QEMU's background snapshot)")
    mode.add_argument("--no-pause", dest="pause", action="store_false",
                      help="as for a dump: do not pause the guest (a fuzzy vmcore)")
    p.add_argument("--allow-readable-by-others", action="store_true",
                   help="as for a dump: write where the filesystem lets others read")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line per vmcore: the trigger and the dump's report")
    return p


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_vm_options(p, args)
    signals.install()
    target = vm_target(args)
    request = Request(output="", via=args.via, debug_file=args.debug_file,
                      qmp_timeout=args.qmp_timeout, stall_timeout=args.stall_timeout,
                      pause=args.pause, live=args.live, connect=args.connect,
                      allow_readable_by_others=args.allow_readable_by_others)

    def say(text: str) -> None:
        print(f"livedump watch: {text}", file=sys.stderr, flush=True)

    def report(taken: Taken) -> None:
        if args.json:
            print(json.dumps({"trigger": taken.trigger.kind, "detail": taken.trigger.detail,
                              "error": None if taken.error is None else str(taken.error),
                              "dump": None if taken.summary is None
                              else as_json(taken.summary)}), flush=True)
            return
        said = f"{taken.trigger.kind} ({taken.trigger.detail})"
        if taken.summary is not None:
            print(f"livedump watch: {said}: {summary_line(taken.summary)}", flush=True)
        else:
            print(f"livedump watch: {said}: no vmcore: {taken.error}", flush=True)

    try:
        return watch(target, args.directory, request, args.once, say, report)
    except (LivedumpError, Interrupted) as e:
        print(f"livedump: {e}", file=sys.stderr)
        return e.exit_code
