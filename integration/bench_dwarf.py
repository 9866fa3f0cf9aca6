"""How long livedump takes to learn QEMU's structure layouts from its DWARF.

    python3 -m integration.bench_dwarf [QEMU] [--debug-file FILE] [--runs N]

QEMU defaults to the debug build of integration/build-qemu-debug.sh. Each
run is a fresh Python process, as the livedump command is, timing
``qemu_layout()`` (find the debug info, then read the layout) in it:
  cold  no layout cache: the DWARF is read
  warm  the cache the run before wrote
The layout cache lives in a temporary directory, never the user's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_QEMU = Path.home() / ".cache/livedump/qemu-debug/bin/qemu-system-x86_64"

CHILD = """
import json, sys, time
start = time.perf_counter()
from livedump.ptrace import dwarf
imported = time.perf_counter()
layout = dwarf.qemu_layout(sys.argv[1], sys.argv[2] or None)
done = time.perf_counter()
print(json.dumps({"import": imported - start, "layout": done - imported,
                  "build_id": layout.build_id}))
"""


def run(qemu: str, debug_file: str, cache: str) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    out = subprocess.run([sys.executable, "-c", CHILD, qemu, debug_file], env=env, check=True,
                         capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("qemu", nargs="?", default=str(DEFAULT_QEMU))
    p.add_argument("--debug-file", default="", help="where its DWARF is (default: found)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if not Path(args.qemu).exists():
        sys.exit(f"no {args.qemu}: build it with integration/build-qemu-debug.sh")
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="livedump-bench-dwarf-") as cache:
        layouts = Path(cache) / "livedump" / "layouts"
        for _ in range(args.runs):
            for f in layouts.glob("*.json"):
                f.unlink()
            results["cold"].append(run(args.qemu, args.debug_file, cache))
            results["warm"].append(run(args.qemu, args.debug_file, cache))
    print(f"{args.qemu} (build-id {results['cold'][0]['build_id']}), {args.runs} runs each")
    print(f"{'':6}{'layout median':>15}{'min':>9}{'max':>9}{'import livedump.ptrace.dwarf':>24}")
    for kind, rs in results.items():
        times = [r["layout"] for r in rs]
        print(f"{kind:6}{statistics.median(times):>13.3f} s{min(times):>7.3f} s"
              f"{max(times):>7.3f} s{statistics.median(r['import'] for r in rs):>22.3f} s")


if __name__ == "__main__":
    main()
