"""The QEMUs the integration tests run, as data: the system's and a QEMU 10.0.

Users run QEMU 7.2 (Debian 12) through 10.x (Debian 13, and Debian 12 with
bookworm-backports), so the tests run two: the system's
``qemu-system-x86_64`` and QEMU 10.0. Where the system's QEMU is 10.x
itself (Debian 13), that is the one. Elsewhere QEMU 10.0 comes from
Debian's bookworm-backports on the host's own Debian mirror: ``apt-get download``
through a private source list, package lists and cache (the host's apt
configuration and state stay as they are), unpacked with ``dpkg -x`` into
``~/.cache/livedump/qemu-10.0`` once. The cache is put in place by one
rename after the unpacked QEMU has run, so a partial one is never taken for
a whole one.

An unpacked Debian QEMU is not relocatable: it loads its modules from its
built-in directory, where the system's QEMU keeps modules of another build,
which it refuses and then aborts on (``-device help`` or ``-device
virtio-vga`` do it). So it runs in a private mount namespace with its own
module directory bind-mounted over the built-in one (``unshare -m``, then
``mount --bind``, then ``exec``: the PID its caller sees is QEMU's), and
with ``-L`` at its own firmware, SeaBIOS of the same backport. Making the
namespace needs root, as the tests do.

The tests of ``--via ptrace`` need QEMUs with DWARF, which Debian's packages
lack: ``integration/build-qemu-debug.sh`` builds them, the system's from
Debian's source package (7.2 on Debian 12, 10.0 on Debian 13) and, where
the system's is older, 10.0 from the upstream tarball of the backport (its
Debian changes are no longer served), each cached in its own directory.
They are QEMUs here too, by series "7.2-debug" and "10.0-debug"; built
without modules and knowing where their firmware is, each is started by its
binary alone.

    python -m integration.qemus                the QEMUs this machine has
    python -m integration.qemus --fetch        fetch QEMU 10.0 first, unless here
    python -m integration.qemus --source DIR   QEMU 10.0's source tarball into DIR
    python -m integration.qemus --firmware     QEMU 10.0's firmware directories
"""

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

SYSTEM = "qemu-system-x86_64"
CACHE = Path.home() / ".cache" / "livedump" / "qemu-10.0"
FETCHED = "10.0"
# Where integration/build-qemu-debug.sh caches the debug builds, by the series
# each must be: the system QEMU's (7.2 on Debian 12, 10.0 on Debian 13), and 10.0.
OWN = "system"
DEBUG_CACHES = {OWN: CACHE.parent / "qemu-debug", FETCHED: CACHE.parent / "qemu-10.0-debug"}
# Debian 12's backports carry QEMU 10.0; the distribution its mirror must serve.
RELEASE, SUITE = "bookworm", "bookworm-backports"
# qemu-system-x86 needs the others at exactly its version (seabios: the
# backport). The module packages (-modules-spice, -modules-opengl) are left
# out: a guest with -display none needs none of them, and in the namespace
# a module that is not there fails with a message, not an abort.
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
# Written last into the cache: it is there only in a whole one.
MANIFEST = "packages"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# Run in the new namespace as: sh -c SHADOW NAME OUR_MODULES BUILT_IN QEMU ARGS...
SHADOW = 'mount --bind "$1" "$2" || exit 125; shift 2; unset QEMU_MODULE_DIR; exec "$@"'


class FetchError(Exception):
    """QEMU 10.0 could not be had here; the message says why."""


@dataclass(frozen=True)
class Qemu:
    """A qemu-system-x86_64 build and how to start it.

    ``root`` is the tree an unpacked QEMU came from, whose modules and
    firmware it must use; None for an installed QEMU or a debug build, which
    find their own. ``debug``: built with DWARF by build-qemu-debug.sh.
    """

    binary: Path
    root: Path | None = None
    debug: bool = False

    def command(self, unprivileged: bool = False) -> list[str]:
        """The argv prefix that starts this QEMU; callers append its options.

        The process it starts becomes QEMU (same PID, ``/proc/PID/exe`` the
        binary), so callers can wait for, signal and dump it as any QEMU.
        ``unprivileged``: for a caller without CAP_SYS_ADMIN (libvirt's QEMU
        user), the mount namespace is in a user namespace of its own, where
        QEMU's user is root.
        """
        if self.root is None:
            return [str(self.binary)]
        ours = _module_dir(self.root)
        built_in = Path("/") / ours.relative_to(self.root)
        user = ["--user", "--map-root-user"] if unprivileged else []
        return ["unshare", *user, "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", SHADOW, "qemu-namespace", str(ours), str(built_in),
                str(self.binary), *(a for d in self.firmware for a in ("-L", str(d)))]

    @property
    def firmware(self) -> list[Path]:
        """The directories an unpacked QEMU's firmware is in; none for the others."""
        if self.root is None:
            return []
        return [self.root / "usr/share/qemu", self.root / "usr/share/seabios"]

    @cached_property
    def banner(self) -> str:
        """The first line of ``--version``: "QEMU emulator version 10.0.2 (Debian ...)"."""
        r = subprocess.run([*self.command(), "--version"], capture_output=True, text=True)
        if r.returncode != 0 or not r.stdout.startswith("QEMU emulator version "):
            raise FetchError(f"{self.binary} --version failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout.splitlines()[0]

    @property
    def version(self) -> tuple[int, ...]:
        """The release, as (major, minor, micro)."""
        m = re.match(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)", self.banner)
        if m is None:
            raise FetchError(f"no version in {self.banner!r}")
        return tuple(int(x) for x in m.groups())

    @property
    def series(self) -> str:
        """"7.2", "10.0", "10.0-debug": what the tests are parametrised by."""
        return "{}.{}".format(*self.version) + ("-debug" if self.debug else "")


def system() -> Qemu | None:
    """The ``qemu-system-x86_64`` on PATH, if there is one."""
    path = shutil.which(SYSTEM)
    return Qemu(Path(path)) if path else None


def is_new(qemu: Qemu) -> bool:
    """A 10.x, as Debian 13 has: it stands for 10.0, and nothing is fetched beside it."""
    return qemu.version[0] == int(FETCHED.split(".")[0])


def cached(cache: Path = CACHE) -> Qemu | None:
    """The QEMU a whole earlier fetch unpacked into ``cache``, if one did."""
    if not (cache / MANIFEST).is_file():
        return None
    return Qemu(cache / "root/usr/bin" / SYSTEM, cache / "root")


def available(cache: Path = CACHE) -> dict[str, Qemu]:
    """This machine's QEMUs by series, the system's first; never fetches."""
    found: dict[str, Qemu] = {}
    for qemu in (system(), cached(cache)):
        if qemu is not None:
            found.setdefault(qemu.series, qemu)
    return found


def debug_builds(caches: dict[str, Path] = DEBUG_CACHES) -> dict[str, Qemu]:
    """The debug builds this machine has, by series ("7.2-debug"); never builds.

    A cache counts once build-qemu-debug.sh put its binary there, which it
    does last, after the build ran; one of another series than its
    directory's (``OWN``: the system QEMU's) is refused, so a test never
    runs the wrong QEMU under a name. Where the system's QEMU is 10.x, its
    own debug build is the 10.0 one: build-qemu-debug.sh makes no other.
    """
    found: dict[str, Qemu] = {}
    for series, cache in caches.items():
        binary = cache / "bin" / SYSTEM
        if not os.access(binary, os.X_OK):
            continue
        qemu = Qemu(binary, debug=True)
        if series == OWN:
            own = system()
            series = own.series if own is not None else qemu.series.removesuffix("-debug")
        if qemu.series != f"{series}-debug":
            raise FetchError(f"{cache} holds QEMU {qemu.series}, not {series}")
        found.setdefault(qemu.series, qemu)
    return found


def fetch(cache: Path = CACHE) -> Qemu:
    """QEMU 10.0: the system's if it is 10.x, else bookworm-backports', fetched once.

    Concurrent callers wait on a lock beside the cache; the second one finds
    the first one's cache.
    """
    own = system()
    if own is not None and is_new(own):
        return own
    found = cached(cache)
    if found is not None:
        return found
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{cache}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = cached(cache)
        if found is not None:
            return found
        # A killed fetch's leftovers: none is in use while we hold the lock.
        for stale in cache.parent.glob(f"{cache.name}.tmp.*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f"{cache.name}.tmp.", dir=cache.parent) as tmp:
            work = Path(tmp)
            debs = _download(work)
            stage = work / cache.name
            (stage / "root").mkdir(parents=True)
            for deb in debs:
                _run(["dpkg", "-x", str(deb), str(stage / "root")])
            _check(Qemu(stage / "root/usr/bin" / SYSTEM, stage / "root"))
            (stage / MANIFEST).write_text("".join(f"{_deb_field(d, 'Package')} "
                                                  f"{_deb_field(d, 'Version')}\n" for d in debs))
            if cache.exists():  # Left by something else than fetch(): not whole.
                cache.rename(work / "old")
            stage.rename(cache)
    found = cached(cache)
    assert found is not None
    return found


def _backports(work: Path, kind: str) -> list[str]:
    """apt-get options for an apt of its own in ``work`` that knows only
    bookworm-backports' ``kind`` ("deb", "deb-src") lists, on the host's
    mirror, already updated."""
    mirror = _mirror()
    arch = _run(["dpkg", "--print-architecture"]).strip()
    options = [f"arch={arch}"] + ([f"signed-by={KEYRING}"] if KEYRING.exists() else [])
    apt = private_apt(work, f"{kind} [{' '.join(options)}] {mirror} {SUITE} main\n")
    _run(["apt-get", "-q", *apt, "update"])
    return apt


def private_apt(work: Path, sources: str) -> list[str]:
    """apt-get options for an apt of its own in ``work`` that reads only the
    ``sources`` list given, with nothing installed (the candidates are the
    lists'), leaving the host's apt state untouched; not yet updated."""
    listing = work / "sources.list"
    listing.write_text(sources)
    (work / "lists/partial").mkdir(parents=True)
    (work / "cache/archives/partial").mkdir(parents=True)
    status = work / "status"
    status.touch()
    apt = [f"-oDir::Etc::SourceList={listing}", "-oDir::Etc::SourceParts=/dev/null",
           f"-oDir::State::Lists={work / 'lists'}", f"-oDir::State::status={status}",
           f"-oDir::Cache={work / 'cache'}", "-oDir::Cache::pkgcache=",
           "-oDir::Cache::srcpkgcache=", "-oDir::Etc::Preferences=/dev/null",
           "-oDir::Etc::PreferencesParts=/dev/null"]
    if os.geteuid() == 0:  # apt's _apt user cannot reach a private directory under $HOME.
        apt.append("-oAPT::Sandbox::User=root")
    return apt


def _download(work: Path) -> list[Path]:
    """PACKAGES from bookworm-backports, on the mirror the host uses for bookworm."""
    apt = _backports(work, "deb")
    debs = work / "debs"
    debs.mkdir()
    _run(["apt-get", "-q", *apt, "download", *PACKAGES], cwd=debs)
    found = sorted(debs.glob("*.deb"))
    if len(found) != len(PACKAGES):
        raise FetchError(f"apt-get download gave {[d.name for d in found]}, not {PACKAGES}")
    return found


def source(dest: Path) -> Path:
    """The upstream tarball QEMU 10.0's backport is built from, into ``dest``.

    The archive still serves the backport's ``qemu_*+ds.orig.tar.xz`` but
    no longer its .dsc and Debian changes, so ``apt-get source`` fails on
    those after it fetched the tarball; the tarball counts if it has the
    size and SHA256 the archive's source index gives it.
    """
    with tempfile.TemporaryDirectory(prefix="qemu-source.", dir=dest) as tmp:
        work = Path(tmp)
        apt = _backports(work, "deb-src")
        uris = _run(["apt-get", "-q", *apt, "source", "--print-uris", "qemu"])
        m = re.search(r"^'\S+' (qemu_(\d+\.\d+)\.\d+\+ds\.orig\.tar\.xz) (\d+) "
                      r"SHA256:([0-9a-f]{64})$", uris, re.MULTILINE)
        if m is None:
            raise FetchError(f"{SUITE} names no upstream tarball of qemu:\n{uris.strip()}")
        name, series, size, sha256 = m[1], m[2], int(m[3]), m[4]
        if series != FETCHED:
            raise FetchError(f"{SUITE} has the source of QEMU {series}, not {FETCHED}")
        got = work / "got"
        got.mkdir()
        subprocess.run(["apt-get", "-q", *apt, "source", "--download-only", "qemu"], cwd=got,
                       stdin=subprocess.DEVNULL, capture_output=True)
        tarball = got / name
        if not tarball.is_file():
            raise FetchError(f"apt-get source qemu did not fetch {name} from {SUITE}")
        digest = hashlib.sha256()
        with open(tarball, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if tarball.stat().st_size != size or digest.hexdigest() != sha256:
            raise FetchError(f"{name} from {SUITE} is not the one its source index names")
        return tarball.rename(dest / name)


def _mirror() -> str:
    """The host's Debian mirror for bookworm main, as its apt sources name it."""
    targets = _run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)",
                    "Created-By: Packages"])
    for line in targets.splitlines():
        uri, release, component = line.split()
        if release == RELEASE and component == "main":
            return uri
    raise FetchError(f"QEMU {FETCHED} comes from {SUITE}, but the host's apt sources name no "
                     f"Debian mirror for {RELEASE} main (this is not Debian 12)")


def _check(qemu: Qemu) -> None:
    """The unpacked QEMU is 10.0, finds its libraries, and loads its own modules.

    ``-device help`` loads every module it knows: out of the namespace this
    aborts on the system's modules.
    """
    missing = [line.split()[0] for line in _run(["ldd", str(qemu.binary)]).splitlines()
               if "not found" in line]
    if missing:
        raise FetchError(f"QEMU {FETCHED} needs libraries this machine lacks: "
                         f"{', '.join(missing)} (install them with apt-get)")
    if qemu.series != FETCHED:
        raise FetchError(f"{SUITE} gave {qemu.banner!r}, not QEMU {FETCHED}")
    devices = _run([*qemu.command(), "-device", "help"])
    if '"virtio-vga"' not in devices:  # A device that is in a module.
        raise FetchError(f"QEMU {FETCHED} did not load its own modules")


def _module_dir(root: Path) -> Path:
    """Where the unpacked packages put QEMU's modules: its built-in module directory."""
    dirs = [d for d in root.glob("usr/lib/*/qemu") if any(d.glob("*.so"))]
    if len(dirs) != 1:
        raise FetchError(f"no single module directory in {root}: {dirs}")
    return dirs[0]


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "--field", str(deb), name]).strip()


def _run(argv: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FetchError(f"{' '.join(argv)} failed (exit {r.returncode}):\n"
                         f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def describe(qemu: Qemu) -> str:
    """One line for a person: series, how it is run, and from where."""
    if qemu.debug:
        how = f"built with debug info in {qemu.binary.parent.parent}"
    elif qemu.root is None:
        how = "the system's"
    else:
        how = f"unpacked in {qemu.root.parent}"
    return f"{qemu.series}: {qemu.banner.removeprefix('QEMU emulator version ')}, {how}"


def main(argv: list[str]) -> int:
    if not (argv in ([], ["--fetch"], ["--firmware"])
            or (len(argv) == 2 and argv[0] == "--source")):
        print(__doc__.rsplit("\n\n", 1)[1], file=sys.stderr)
        return 2
    try:
        if argv[:1] == ["--source"]:
            print(source(Path(argv[1]).resolve()))
            return 0
        if argv:
            own = system()
            if cached() is None and (own is None or not is_new(own)):
                print(f"qemus: fetching QEMU {FETCHED} from {SUITE}", file=sys.stderr)
            new = fetch()
            if argv == ["--firmware"]:
                # An installed QEMU's are where Debian's packages put them.
                for directory in new.firmware or [Path("/usr/share/qemu"),
                                                  Path("/usr/share/seabios")]:
                    print(directory)
                return 0
        for qemu in [*available().values(), *debug_builds().values()]:
            print(describe(qemu))
    except FetchError as e:
        print(f"qemus: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
