"""livedump against QEMU's own dump-guest-memory, side by side on the same guests,
on each QEMU this machine has (integration/qemus.py: the system's and 10.0).

    python3 -m integration.bench [--runs N] [--scenarios a,b,c] [--qemus 7.2,10.0]
                                 [--dir /dev/shm]

Scenarios (each guest started here, running while it is dumped):
  a  1 GiB guest with all of its RAM written (random bytes loaded at power-on)
  b  idle 8 GiB guest: only what the firmware touched
  b0 the guest of (b) once QEMU's own dump has read all its RAM (into a
     pipe, drained): every page it never wrote is then the kernel's zero page
  c  4 GiB guest running Linux, 1 GiB touched by a process (needs the Linux
     guest files of integration/linux_guest.py; built on first use)
  live  the guest of (a), livedump with --live: the guest is paused only
     until QEMU has taken its background snapshot
  dmesg  the guest of (c): the kernel's log by ``livedump dmesg`` (running,
     and --pause), against a vmcore by livedump then ``makedumpfile
     --dump-dmesg`` of it, the usual way without a vmlinux (a table of its own)
  filtered  one Linux guest (4 GiB by default, --filtered-gib) with half its
     RAM in page cache (files in tmpfs) and a quarter in user memory, idle,
     all its RAM read once by QEMU's dump first (as a guest that has run for
     long has touched it all): livedump --format kdump -d 31, livedump's ELF,
     QEMU's dump-guest-memory -z (kdump-zlib: its pause is its whole wall),
     and livedump's ELF then makedumpfile -c -d 31, all on that one guest
     (filling memory under TCG is slow), in turns (a table of its own)
  core  a crashed QEMU's core: the gcore of the 7.2 debug build running an
     idle 1 GiB guest, paused; QEMU 7.2's scripts/dump-guest-memory.py under
     gdb against livedump --core, on the same core file (the script is taken
     from Debian's source package of that build, once, into
     ~/.cache/livedump/seed/)

For each scenario and each QEMU, the two tools run alternately (QEMU first
on even runs, livedump first on odd ones), each on a freshly started guest
of that QEMU, and the table shows medians of:
  wall      seconds from the command to its completion (livedump: the whole
            process, Python start-up included)
  pause     seconds between QEMU's STOP and RESUME events, read with their
            timestamps on a second QMP connection
  allocated bytes the output file takes on disk (st_blocks)
  peak RSS  of the dumping process, its VmHWM as it exits (QEMU's dump runs
            inside QEMU: not shown)
Below the table: the bare read ceilings of /proc/PID/mem and
process_vm_readv (one thread, a first pass over a fresh guest's RAM),
livedump's read rate over its pause, and what its file allocated against
the bytes QEMU has pages for in the ranges livedump dumped, and those of
them that are not all zeros (counted on the same guest right after the dump).
"""

import argparse
import array
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import qemus
from .qemus import Qemu
from .vm import VM, kvm_usable, pause_of

GiB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Run:
    wall: float
    pause: float
    allocated: int
    rss: int | None = None
    read_bytes: int | None = None
    present: int | None = None  # bytes of the dumped ranges QEMU has pages for
    data: int | None = None  # of those, the bytes of pages that are not all zeros


def qemu_dump(vm: VM, out: Path) -> Run:
    vm.event_log()
    start = time.monotonic()
    vm.own_dump(out)
    wall = time.monotonic() - start
    run = Run(wall, pause_of(vm.event_log()), os.stat(out).st_blocks * 512)
    out.unlink()
    return run


# livedump run so that its own peak RSS can be known: VmHWM of its address
# space, read as it exits. (wait4's ru_maxrss would not do: at exec the kernel
# hands the child the peak of the address space it replaces, the bench's own.)
_MEASURED = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status, open(os.environ["BENCH_PEAK_RSS"], "w") as out:
        out.write(next(l for l in status if l.startswith("VmHWM:")).split()[1])
atexit.register(peak)
sys.argv[0] = "livedump"
runpy.run_module("livedump", run_name="__main__")
"""


def livedump(vm: VM, out: Path, *options: str, counted: bool = True,
             keep: bool = False) -> Run:
    """livedump's run; ``counted``: with the bytes present and of data in what it
    dumped (read afterwards, slow on big guests); ``keep``: leave ``out`` in place."""
    vm.event_log()
    peak_file = out.with_name("peak-rss")
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _MEASURED, "--pid", str(vm.pid), "--quiet", "--json", *options,
         str(out)], stdout=subprocess.PIPE, env={**os.environ, "BENCH_PEAK_RSS": str(peak_file)})
    report = proc.stdout.read()
    status = proc.wait()
    wall = time.monotonic() - start
    if status != 0:
        raise RuntimeError(f"livedump failed with status {status}")
    summary = json.loads(report)
    run = Run(wall, pause_of(vm.event_log()), os.stat(out).st_blocks * 512,
              rss=int(peak_file.read_text()) * 1024, read_bytes=summary["read_bytes"])
    if counted:
        # Counted after the dump, which populates no private page it did not find populated.
        present = present_runs(vm.pid, [(b["hva"], b["size"]) for b in summary["blocks"]])
        run.present = sum(size for _, size in present)
        run.data = data_bytes(vm.pid, present)
    if not keep:
        out.unlink()
    peak_file.unlink()
    return run


def ram_mappings(vm: VM) -> list[tuple[int, int]]:
    """(host address, size) of the guest's main RAM block, through the monitor."""
    def hmp(line: str) -> str:
        return vm.qmp.cmd("human-monitor-command", **{"command-line": line})

    hva = int(hmp("gpa2hva 0").split()[-1], 16)
    for line in hmp("info ramblock").splitlines()[1:]:
        fields = line.split()  # name, page size (2 words), offset, used, total
        if fields and fields[0] in ("pc.ram", "ram0"):
            return [(hva, int(fields[4], 16))]
    raise RuntimeError("no pc.ram block")


def present_bytes(pid: int, mappings: list[tuple[int, int]]) -> int:
    """Bytes of the mappings that the kernel has pages for (present or swapped)."""
    return sum(n for _, n in present_runs(pid, mappings))


def data_bytes(pid: int, runs: list[tuple[int, int]]) -> int:
    """Bytes of the pages in ``runs`` (of :func:`present_runs`) that hold anything
    but zeros (read page by page: no page that was not there is populated)."""
    zero, total, piece = bytes(PAGE), 0, 1 << 20
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for hva, size in runs:
            for done in range(0, size, piece):
                mem.seek(hva + done)
                data = mem.read(min(piece, size - done))
                total += sum(PAGE for at in range(0, len(data), PAGE)
                             if data[at : at + PAGE] != zero)
    return total


def present_runs(pid: int, mappings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, size) of each run of present or swapped pages in the mappings."""
    runs = []
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for hva, size in mappings:
            f.seek(hva // PAGE * 8)
            entries = array.array("Q", f.read(size // PAGE * 8))
            for i, e in enumerate(entries):
                if e >> 62:
                    address = hva + i * PAGE
                    if runs and runs[-1][0] + runs[-1][1] == address:
                        runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
                    else:
                        runs.append((address, PAGE))
    return runs


def read_ceiling(pid: int, mappings: list[tuple[int, int]], syscall: bool) -> float:
    """GB/s of a bare single-threaded read loop over the RAM, 1 MiB at a time:
    process_vm_readv if ``syscall``, else preadv on /proc/PID/mem."""
    chunk = 1 << 20
    buf = bytearray(chunk)
    view = memoryview(buf)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    class IOVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    local = IOVec(ctypes.addressof((ctypes.c_char * chunk).from_buffer(buf)), chunk)
    start = time.monotonic()
    total = 0
    for hva, size in mappings:
        for off in range(0, size, chunk):
            if syscall:
                remote = IOVec(hva + off, chunk)
                n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
                if n != chunk:
                    raise OSError(ctypes.get_errno(), "process_vm_readv")
            else:
                n = os.preadv(fd, [view], hva + off)
            total += n
    os.close(fd)
    return total / (time.monotonic() - start) / 1e9


def scenario_vm(name: str, workdir: Path, qemu: Qemu) -> VM:
    if name in ("a", "live"):
        return VM(machine="pc", memory="1G", qemu=qemu, extra=[
            "-object", "memory-backend-ram,id=ram0,size=1G,prealloc=on",
            "-machine", "memory-backend=ram0"])
    if name == "a'":
        blob = workdir / "random-1g.bin"
        if not blob.exists():
            with open(blob, "wb") as f:
                for _ in range(1024):
                    f.write(os.urandom(1 << 20))
        return VM(machine="pc", memory="1G", qemu=qemu,
                  extra=["-device", f"loader,file={blob},addr=0,force-raw=on"])
    if name in ("b", "b0"):
        return VM(machine="q35", memory="8G", qemu=qemu)
    if name == "c":
        from .linux_guest import LinuxVM

        return LinuxVM(memory="4G", touch_mib=1024, qemu=qemu)
    raise ValueError(name)


# Every measurement gets a VM of its own: reading memory that was never
# populated (as QEMU's dump does) makes the kernel map its zero page there,
# which would change what the next dump of the same VM finds.
SCENARIOS = {
    "a": "(a) 1 GiB, all RAM populated (zeros)",
    "a'": "(a') 1 GiB, all RAM random bytes",
    "b": "(b) idle 8 GiB",
    "b0": "(b0) idle 8 GiB, after QEMU's dump",
    "c": "(c) 4 GiB Linux, 1 GiB touched",
    "live": "(live) 1 GiB populated, --live",
    "core": "(core) gcore of a 1 GiB guest",
    "filtered": "(filtered) {gib} GiB Linux, {cache} GiB cache, {user} GiB user",
}
OPTIONS = {"live": ("--live",)}  # livedump's options per scenario


SEED_CACHE = Path.home() / ".cache/livedump/seed"


def seed_script() -> Path:
    """QEMU 7.2's scripts/dump-guest-memory.py, from the source package the
    debug build was built from (apt-get source, deb-src as build-qemu-debug.sh
    configured it), kept in :data:`SEED_CACHE`."""
    script = SEED_CACHE / "dump-guest-memory.py"
    if script.exists():
        return script
    from .qemus import DEBUG_CACHES

    info = (DEBUG_CACHES["7.2"] / "BUILD-INFO").read_text()
    version = next(line.split()[-1] for line in info.splitlines()
                   if line.startswith("source: qemu "))
    work = SEED_CACHE / "download"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "source", "--download-only", "-q", f"qemu={version}"],
                   cwd=work, check=True, capture_output=True)
    tarball = next(work.glob("qemu_*.orig.tar.*"))
    subprocess.run(["tar", "-xf", str(tarball), "--strip-components=2", "-C", str(SEED_CACHE),
                    "--wildcards", "*/scripts/dump-guest-memory.py"], check=True)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return script


def timed(argv: list[str], out: Path) -> Run:
    """Wall time and the output's allocation of one command that writes ``out``;
    its peak RSS from wait4 (a fresh process: gdb, or livedump through -c)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stderr = proc.stderr.read() if proc.stderr else b""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {stderr.decode()[-500:]}")
    run = Run(wall, 0.0, os.stat(out).st_blocks * 512, rss=usage.ru_maxrss * 1024)
    out.unlink()
    return run


def measure_core(runs: int, workdir: Path) -> tuple[list[Run], list[Run], str]:
    """The seed script under gdb and livedump --core, alternately, on one core."""
    from .qemus import debug_builds

    qemu = debug_builds()["7.2-debug"]
    script = seed_script()
    with VM(qemu=str(qemu.binary), machine="pc", memory="1G",
            livedump_socket=False) as vm:
        vm.wait_running(2)
        vm.command("stop")
        subprocess.run(["gcore", "-o", str(workdir / "core"), str(vm.pid)], check=True,
                       capture_output=True)
        core = workdir / f"core.{vm.pid}"
    out = workdir / "out.vmcore"
    seed = ["gdb", "-batch", "-nx", "-ex", f"source {script}",
            "-ex", f"dump-guest-memory {out} X86_64", str(qemu.binary), str(core)]
    ours = [sys.executable, "-m", "livedump", "--core", str(core), "--quiet", str(out)]
    seed_runs: list[Run] = []
    our_runs: list[Run] = []
    for i in range(runs):
        pair = [(seed_runs, seed), (our_runs, ours)]
        for results, argv in pair if i % 2 == 0 else list(reversed(pair)):
            results.append(timed(argv, out))
    return seed_runs, our_runs, (f"core of {os.stat(core).st_size / GiB:.2f} GiB (gcore of "
                                 f"the 7.2 debug build, 1 GiB guest), read from {workdir}")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.1f} MiB"


def dumped_once(vm: VM, workdir: Path) -> None:
    """QEMU's own dump of the VM, read and thrown away: through a FIFO, as
    /dev/null's write would not even read the pages."""
    fifo = workdir / "qemu-dump.fifo"
    os.mkfifo(fifo)
    drain = subprocess.Popen(["dd", f"if={fifo}", "of=/dev/null", "bs=1M", "status=none"])
    try:
        vm.own_dump(fifo)
    finally:
        drain.wait()
        fifo.unlink()


def started(name: str, workdir: Path, qemu: Qemu) -> VM:
    """A new VM of the scenario on ``qemu``, past its firmware or boot."""
    vm = scenario_vm(name, workdir, qemu).__enter__()
    try:
        if name == "c":
            vm.wait_idle()
        else:
            vm.wait_running(2)
        if name == "b0":
            dumped_once(vm, workdir)
    except BaseException:
        vm.__exit__()
        raise
    return vm


def measure(name: str, runs: int, workdir: Path, qemu: Qemu
            ) -> tuple[list[Run], list[Run], str]:
    """Alternate the two tools ``runs`` times on guests of ``qemu``; return their
    runs and a note on the guest."""
    out = workdir / "out.vmcore"
    qemu_runs: list[Run] = []
    ours: list[Run] = []
    for i in range(runs):
        pair = [(qemu_runs, qemu_dump),
                (ours, lambda vm, out: livedump(vm, out, *OPTIONS.get(name, ())))]
        for results, tool in pair if i % 2 == 0 else list(reversed(pair)):
            vm = started(name, workdir, qemu)
            try:
                results.append(tool(vm, out))
            finally:
                vm.__exit__()
    # Each ceiling on a VM of its own: a first pass over guest pages, as a dump makes,
    # is slower than a second.
    rates = []
    for syscall in (False, True):
        vm = started(name, workdir, qemu)
        try:
            mappings = ram_mappings(vm)
            present = present_bytes(vm.pid, mappings)
            rates.append(read_ceiling(vm.pid, mappings, syscall))
        finally:
            vm.__exit__()
    mem_rate, vm_rate = rates
    return qemu_runs, ours, (
        f"main RAM pages present {fmt_bytes(present)}; bare read of its RAM: /proc/PID/mem "
        f"{mem_rate:.2f} GB/s, process_vm_readv {vm_rate:.2f} GB/s")


def dmesg_bench(runs: int, workdir: Path, qemu: Qemu) -> str:
    """``livedump dmesg`` against livedump + ``makedumpfile --dump-dmesg``, on one
    guest of scenario (c) (reading the log changes nothing a later run would see);
    the table's lines. Each way's text must be the same log."""
    vm = started("c", workdir, qemu)
    vmcore, text = workdir / "out.vmcore", workdir / "dmesg.txt"
    command = [sys.executable, "-m", "livedump"]

    def ours(*options: str) -> tuple[float, float]:
        vm.event_log()
        start = time.monotonic()
        r = subprocess.run([*command, "dmesg", "--pid", str(vm.pid), *options],
                           capture_output=True, check=True)
        wall = time.monotonic() - start
        assert b"Linux version" in r.stdout
        return wall, pause_of(vm.event_log()) if options else 0.0

    def theirs() -> tuple[float, float]:
        vm.event_log()
        start = time.monotonic()
        subprocess.run([*command, "-q", "--pid", str(vm.pid), str(vmcore)], check=True)
        subprocess.run(["makedumpfile", "--dump-dmesg", str(vmcore), str(text)], check=True,
                       capture_output=True)
        wall = time.monotonic() - start
        assert b"Linux version" in text.read_bytes()
        vmcore.unlink()
        text.unlink()
        return wall, pause_of(vm.event_log())

    ways = {"livedump dmesg": lambda: ours(), "livedump dmesg --pause": lambda: ours("--pause"),
            "livedump + makedumpfile": theirs}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        for i in range(runs):
            for name, way in ways.items() if i % 2 == 0 else reversed(ways.items()):
                results[name].append(way())
    finally:
        vm.__exit__()
    lines = [f"{'kernel log of ' + SCENARIOS['c']:48} {'wall s':>7} {'pause s':>8}"]
    for name, got in results.items():
        lines.append(f"  {name:46} {statistics.median(w for w, _ in got):7.2f} "
                     f"{statistics.median(p for _, p in got):8.3f}")
    return "\n".join(lines)


def filtered_bench(runs: int, workdir: Path, qemu: Qemu, gib: int) -> str:
    """The filtered scenario's table (see the module's docstring): medians over
    ``runs`` turns on one guest of ``gib`` GiB; each turn takes the ways in
    another order."""
    from .linux_guest import LinuxVM

    cache, user = gib << 9, gib << 8  # MiB: half and a quarter of its RAM
    out, elf = workdir / "out.vmcore", workdir / "out.elf"
    start = time.monotonic()
    vm = LinuxVM(memory=f"{gib}G", touch_mib=user, qemu=qemu,
                 cmdline_extra=[f"livedump.cache={cache}"]).__enter__()
    try:
        vm.wait_idle(timeout=1800)
        dumped_once(vm, workdir)
        built = time.monotonic() - start

        def zlib() -> Run:
            vm.event_log()
            began = time.monotonic()
            vm.own_dump(out, format="kdump-zlib", detach=True)
            run = Run(time.monotonic() - began, pause_of(vm.event_log()),
                      os.stat(out).st_blocks * 512)
            out.unlink()
            return run

        def then_makedumpfile() -> Run:
            began = time.monotonic()
            first = livedump(vm, elf, counted=False, keep=True)
            subprocess.run(["makedumpfile", "-c", "-d", "31", str(elf), str(out)], check=True,
                           capture_output=True)
            run = Run(time.monotonic() - began, first.pause, os.stat(out).st_blocks * 512)
            elf.unlink()
            out.unlink()
            return run

        ways: dict[str, Callable[[], Run]] = {
            "livedump --format kdump -d 31": lambda: livedump(
                vm, out, "--format", "kdump", "-d", "31", counted=False),
            "livedump (ELF)": lambda: livedump(vm, out, counted=False),
            "QEMU dump-guest-memory -z (kdump-zlib)": zlib,
            "livedump (ELF), then makedumpfile -c -d 31": then_makedumpfile,
        }
        results: dict[str, list[Run]] = {name: [] for name in ways}
        for i in range(runs):
            for name, way in ways.items() if i % 2 == 0 else reversed(ways.items()):
                results[name].append(way())
    finally:
        vm.__exit__()
    med = {name: Run(*(statistics.median(getattr(r, k) for r in got)
                       for k in ("wall", "pause", "allocated")))
           for name, got in results.items()}
    lines = [f"{SCENARIOS['filtered'].format(gib=gib, cache=cache >> 10, user=user >> 10):48} "
             f"{'wall s':>7} {'pause s':>8} {'allocated':>10}"]
    for name, r in med.items():
        lines.append(f"  {name:46} {r.wall:7.2f} {r.pause:8.3f} {fmt_bytes(r.allocated):>10}")
    kdump, ours = med["livedump --format kdump -d 31"], med["livedump (ELF)"]
    lines.append(f"  kdump -d 31 pause / ELF pause: {kdump.pause / ours.pause:.2f}x; "
                 f"guest built (booted, filled, read once) in {built:.0f} s")
    return "\n".join(lines)


def provenance(chosen: dict[str, Qemu]) -> str:
    """Which code ran where and when, on which QEMUs: figures mean nothing without it."""
    top = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(top), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.machine())
    return (f"livedump {commit}, {time.strftime('%Y-%m-%d %H:%M %Z')}; QEMU "
            f"{'; '.join(qemus.describe(q) for q in chosen.values())}; "
            f"{platform.node()}: {os.cpu_count()} CPUs ({model}), "
            f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB, "
            f"Linux {platform.release()}; KVM {'usable' if kvm_usable() else 'not usable'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scenarios", default="a,a',b,c,live")
    p.add_argument("--qemus", help="the QEMUs, by series (default: every one "
                   "`python -m integration.qemus` lists, debug builds aside)")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--filtered-gib", type=int, default=4,
                   help="RAM of the filtered scenario's guest (half page cache, a quarter "
                   "user memory)")
    args = p.parse_args()
    found = qemus.available()
    wanted = args.qemus.split(",") if args.qemus else list(found)
    if missing := [s for s in wanted if s not in found]:
        p.error(f"no QEMU {', '.join(missing)} here (there are: {', '.join(found)})")
    chosen = {series: found[series] for series in wanted}
    print(provenance(chosen), flush=True)
    print(f"{'scenario':36} {'QEMU':5} {'tool':9} {'wall s':>7} {'pause s':>8} "
          f"{'allocated':>10} {'peak RSS':>9}  livedump/QEMU: wall, pause", flush=True)
    notes = []
    for name, (series, qemu) in ((n, q) for n in args.scenarios.split(",")
                                 for q in chosen.items()):
        if name == "core" and series != next(iter(chosen)):
            continue  # The core of one QEMU build: the QEMUs do not enter into it.
        workdir = args.dir / f"livedump-bench-{os.getpid()}"
        workdir.mkdir()
        try:
            if name == "dmesg":
                notes.append(f"on QEMU {series}: " + dmesg_bench(args.runs, workdir, qemu))
                continue
            if name == "filtered":
                notes.append(f"on QEMU {series}: " + filtered_bench(args.runs, workdir, qemu,
                                                                    args.filtered_gib))
                continue
            if name == "core":
                seed_runs, ours, note = measure_core(args.runs, workdir)
            else:
                qemu_runs, ours, note = measure(name, args.runs, workdir, qemu)
        finally:
            for f in workdir.iterdir():
                f.unlink()
            workdir.rmdir()
        if name == "core":
            s, o = (Run(*(statistics.median(getattr(r, k) for r in runs)
                          for k in ("wall", "pause", "allocated", "rss")))
                    for runs in (seed_runs, ours))
            print(f"{SCENARIOS[name]:36} {'':5} {'seed/gdb':9} {s.wall:7.2f} {'-':>8} "
                  f"{fmt_bytes(s.allocated):>10} {fmt_bytes(s.rss):>9}")
            print(f"{'':36} {'':5} {'livedump':9} {o.wall:7.2f} {'-':>8} "
                  f"{fmt_bytes(o.allocated):>10} {fmt_bytes(o.rss):>9}  "
                  f"{o.wall / s.wall:.2f}x ({s.wall / o.wall:.1f} times faster)", flush=True)
            notes.append(f"{name}: {note}")
            continue
        q = Run(*(statistics.median(getattr(r, k) for r in qemu_runs)
                  for k in ("wall", "pause", "allocated")))
        o = Run(*(statistics.median(getattr(r, k) for r in ours)
                  for k in ("wall", "pause", "allocated", "rss", "read_bytes", "present",
                            "data")))
        title = SCENARIOS[name] if series == next(iter(chosen)) else ""
        print(f"{title:36} {series:5} {'QEMU':9} {q.wall:7.2f} {q.pause:8.3f} "
              f"{fmt_bytes(q.allocated):>10} {'-':>9}")
        print(f"{'':36} {series:5} {'livedump':9} {o.wall:7.2f} {o.pause:8.3f} "
              f"{fmt_bytes(o.allocated):>10} {fmt_bytes(o.rss):>9}  "
              f"{o.wall / q.wall:.2f}x, {o.pause / q.pause:.3f}x", flush=True)
        rate = o.read_bytes / o.pause / 1e9 if o.pause else float("nan")
        notes.append(f"{name} on {series}: {note}; livedump read {fmt_bytes(int(o.read_bytes))} "
                     f"({rate:.2f} GB/s over its pause), allocated {fmt_bytes(int(o.allocated))} "
                     f"for {fmt_bytes(int(o.present))} present in the ranges it dumped, "
                     f"{fmt_bytes(int(o.data))} of them not zeros "
                     f"({o.allocated / o.present:.2f}x present, {o.allocated / o.data:.2f}x data)")
    print()
    print("\n".join(notes))
    print(f"(medians of {args.runs} runs; output on {args.dir})")


if __name__ == "__main__":
    main()
