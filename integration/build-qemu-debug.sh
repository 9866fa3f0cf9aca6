#!/usr/bin/env bash
# (SC2016: apt-get indextargets --format takes literal '$(FIELD)' strings.)
# shellcheck disable=SC2016,SC1091
# build-qemu-debug.sh - build qemu-system-x86_64 WITH DWARF debug info from
# Debian's own QEMU source, for livedump's integration tests (they read
# QEMU's DWARF: AddressSpace, FlatView, FlatRange, MemoryRegion, RAMBlock,
# address_space_memory, X86CPU).
#
# Usage:
#   QEMU=$(integration/build-qemu-debug.sh | tail -1)        # the system's (7.2, 10.0)
#   QEMU=$(integration/build-qemu-debug.sh 10.0 | tail -1)   # bookworm-backports' 10.0
#
# Two sources (both x86_64-softmmu, the same configure options and checks):
#   * default: Debian's source package of the installed QEMU (apt-get
#     source, with Debian's patches), cached in ~/.cache/livedump/qemu-debug:
#     7.2 on Debian 12, 10.0 on Debian 13 (where "10.0" is this one too).
#   * 10.0 (where the system's QEMU is older): the upstream tarball
#     bookworm-backports' QEMU 10.0 is built from
#     (qemu_10.0.*+ds.orig.tar.xz; the archive no longer serves the
#     backport's .dsc and Debian changes, so there are no Debian patches),
#     fetched by integration/qemus.py through its private apt, cached in
#     ~/.cache/livedump/qemu-10.0-debug.
# A source with a pythondeps.toml (QEMU >= 8.1, as 10.0 from either) needs
# meson >= 1.5 and pycotap, which bookworm lacks and Debian's own build of
# 10.0 does not use: the versions pythondeps.toml names come from PyPI into
# a venv in the work dir, passed with configure --python. Its "+ds"
# tarball lacks the bzip2'ed edk2 images pc-bios/meson.build unpacks:
# empty stand-ins do, none is installed.
#
# The last line on stdout is always the absolute path of the binary. All
# progress goes to stderr; the verbose build output goes to a log file
# (copied to $CACHE/build.log on success, ${CACHE}.failed-build.log on
# failure).
#
# Environment:
#   LIVEDUMP_QEMU_CACHE        install/cache dir (default: as above)
#   LIVEDUMP_QEMU_SRC_VERSION  (default source only) Debian source version to
#                              build, e.g. "1:7.2+dfsg-7+deb12u18". Default:
#                              the source version of the installed
#                              qemu-system-x86 if it is downloadable, else
#                              the newest available.
#   LIVEDUMP_PYTHON            python used for the QMP smoke test (needs the
#                              qemu.qmp package, else a stdlib fallback is
#                              used). Default: python3 from $PATH.
#   LIVEDUMP_VERBOSE=1         also stream the build log to stderr.
#   LIVEDUMP_KEEP_WORK=1       keep the temporary source/build dir.
#
# How the result is laid out / found at runtime:
#   * configured with --prefix=$CACHE and installed with DESTDIR into a
#     staging dir, smoke-tested there, then renamed to $CACHE in one step:
#     "$CACHE/bin/qemu-system-x86_64 exists" therefore means "complete and
#     verified". QEMU (>= 5.2) is relocatable: it locates its data dir
#     (share/qemu) relative to the executable, so testing in the staging dir
#     works too.
#   * Debian's "+dfsg" source tarball has the prebuilt firmware blobs
#     removed; like Debian's own build we use --disable-install-blobs and a
#     --firmwarepath pointing at the Debian firmware packages (seabios:
#     bios-256k.bin, vgabios-*.bin; ipxe-qemu: efi-*.rom NIC option ROMs).
#     The x86 option ROMs (kvmvapic.bin, linuxboot_dma.bin, multiboot*.bin,
#     pvh.bin) are built from source with Debian's debian/optionrom.mak (as
#     Debian does; byte-identical to qemu-system-data's) and copied into
#     $CACHE/share/qemu, so the system qemu-system-data package is not needed.
#   * 10.0 has no debian/optionrom.mak (nor has Debian 13's source), and
#     QEMU's own option ROM build needs a 32-bit compiler: its firmware is
#     instead that of the QEMU 10.0 integration/qemus.py finds (the
#     system's on Debian 13; else the backport's qemu-system-data option
#     ROMs and SeaBIOS), copied into $CACHE/share/qemu; for the backport,
#     its --firmwarepath is only ipxe-qemu's, as the system's SeaBIOS
#     (searched before the data dir) is older. So the build starts as
#     itself, without -L.
#
# Build choices:
#   * --enable-debug-info with QEMU's default -O2 plus Debian's
#     dpkg-buildflags (hardening, -g), NOT --enable-debug (which would use
#     -O0 and enable TCG debug/mutex debugging). Struct layouts of the memory
#     API types do not depend on these flags.
#   * --without-default-features turns off every optional 'auto' feature
#     (GUI, VNC, slirp, docs, tools, ...); KVM and TCG are explicitly
#     enabled. Default devices (q35, generic loader, ...) and the QMP/HMP
#     monitor are unaffected.
#   * only what meson installs is built (ninja with those targets, then
#     meson install --no-rebuild), not QEMU's unit tests and helpers.
#   * the build runs under nice -n 10: it shares the machine with tests.

set -euo pipefail

log() { printf '[build-qemu-debug] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SERIES="${1:-}"
case "$SERIES" in
    "") DEFAULT_CACHE=qemu-debug ;;
    10.0) DEFAULT_CACHE=qemu-10.0-debug ;;
    *) die "usage: $0 [10.0]" ;;
esac
[[ $# -le 1 ]] || die "usage: $0 [10.0]"
# Where the system's QEMU is 10.x (Debian 13), its own build is the 10.0 one.
if [[ "$SERIES" == 10.0 ]]; then
    installed=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
    installed=${installed#*:}
    if [[ "${installed%%.*}" == 10 ]]; then
        log "the system's QEMU is $installed: its debug build is QEMU 10.0's"
        exec "$0"
    fi
fi
CACHE="${LIVEDUMP_QEMU_CACHE:-$HOME/.cache/livedump/$DEFAULT_CACHE}"
BIN_REL="bin/qemu-system-x86_64"
REPO="$(cd "$(dirname "$0")/.." && pwd -P)"
# The x86 option ROMs QEMU loads from its data dir.
OPTION_ROMS=(kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin multiboot_dma.bin pvh.bin)

# --- 0. Fast path: an already complete cache -------------------------------
cache_ok() {
    [[ -x "$CACHE/$BIN_REL" ]] && "$CACHE/$BIN_REL" --version >/dev/null 2>&1
}
if cache_ok; then
    printf '%s\n' "$CACHE/$BIN_REL"
    exit 0
fi

# Make CACHE absolute (it is baked into the binary as --prefix).
mkdir -p "$(dirname "$CACHE")"
CACHE="$(cd "$(dirname "$CACHE")" && pwd -P)/$(basename "$CACHE")"

# Serialise concurrent invocations (e.g. parallel test runs); re-check the
# cache once we own the lock, another process may just have finished it.
exec 9>"${CACHE}.lock"
if ! flock -n 9; then
    log "another build holds ${CACHE}.lock; waiting ..."
    flock 9
fi
if cache_ok; then
    printf '%s\n' "$CACHE/$BIN_REL"
    exit 0
fi

T_START=$(date +%s)

# Remember the user's python (pyenv etc.) for the QMP test, then use the
# distro toolchain only for the build itself (meson, python3 for configure).
VERIFY_PYTHON="${LIVEDUMP_PYTHON:-$(command -v python3 || true)}"
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and sudo is not installed"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# Temporary work dir next to the cache (same filesystem => atomic rename).
WORK="$(mktemp -d "${CACHE}.tmp.XXXXXX")"
LOG="$WORK/build.log"
QEMU_PID=""
RUNDIR=""

cleanup() {
    local rc=$?
    if [[ -n "$QEMU_PID" ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        sleep 1
        kill -9 "$QEMU_PID" 2>/dev/null || true
    fi
    [[ -n "$RUNDIR" ]] && rm -rf "$RUNDIR"
    if [[ $rc -ne 0 && -f "$LOG" ]]; then
        cp -f "$LOG" "${CACHE}.failed-build.log" 2>/dev/null || true
        log "FAILED (exit $rc); build log: ${CACHE}.failed-build.log"
    fi
    if [[ "${LIVEDUMP_KEEP_WORK:-0}" == 1 ]]; then
        log "keeping work dir $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run a command with its output appended to the log (and stderr if verbose).
run() {
    printf '\n+ %s\n' "$*" >>"$LOG"
    if [[ "${LIVEDUMP_VERBOSE:-0}" == 1 ]]; then
        "$@" 2>&1 | tee -a "$LOG" >&2
    else
        "$@" >>"$LOG" 2>&1 || {
            local rc=$?
            log "command failed (exit $rc): $*"
            log "last lines of the log:"; tail -n 30 "$LOG" >&2
            return $rc
        }
    fi
}

log "cache: $CACHE (not present or broken -> building)"
log "work dir: $WORK, log: $LOG"

# --- 1. deb-src entries (default source) --------------------------------------
# apt-get source needs deb-src. If apt has no Sources target for our release
# at all, add one (deb822 file) for every Debian mirror/suite already
# configured with Types: deb, component main only. (The 10.0 source comes
# through integration/qemus.py's private apt, which leaves the host's alone.)
. /etc/os-release
CODENAME="${VERSION_CODENAME:?cannot determine Debian codename}"
SRC_LIST=/etc/apt/sources.list.d/livedump-deb-src.sources
NEED_UPDATE=0

if [[ -n "$SERIES" ]]; then
    :
elif apt-get indextargets --format '$(RELEASE) $(COMPONENT)' 'Created-By: Sources' \
        | grep -E "^${CODENAME}(-[a-z]+)? main\$" >/dev/null; then
    log "deb-src for $CODENAME already configured"
else
    log "adding deb-src entries in $SRC_LIST"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    stanzas=""
    # One stanza per mirror URI, with all its configured suites of our release.
    while read -r uri; do
        suites=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
                    'Created-By: Packages' \
                 | awk -v u="$uri" -v c="$CODENAME" \
                     '$1==u && $3=="main" && ($2==c || index($2, c"-")==1) {print $2}' \
                 | sort -u | tr '\n' ' ' | sed 's/ $//')
        [[ -n "$suites" ]] || continue
        stanzas+="Types: deb-src"$'\n'"URIs: ${uri%/}"$'\n'"Suites: $suites"$'\n'
        stanzas+="Components: main"$'\n'
        [[ -f "$keyring" ]] && stanzas+="Signed-By: $keyring"$'\n'
        stanzas+=$'\n'
    done < <(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' | sort -u)
    [[ -n "$stanzas" ]] || die "no 'deb' entries for $CODENAME main found in apt config"
    printf '# Added by livedump integration/build-qemu-debug.sh (apt-get source qemu)\n\n%s' \
        "$stanzas" | "${SUDO[@]}" tee "$SRC_LIST" >/dev/null
    NEED_UPDATE=1
fi

# --- 2. Packages ----------------------------------------------------------------
# Minimal build deps for a x86_64-softmmu build without optional features
# (verified on bookworm): compiler/binutils, dpkg-dev (apt-get source,
# dpkg-buildflags), meson+ninja (the +dfsg tarball has no bundled meson),
# pkg-config, glib, pixman, zlib, and libfdt (x86_64-softmmu has
# TARGET_NEED_FDT=y since QEMU 7.1 for the microvm machine; the +dfsg tarball
# has no bundled dtc, so the system libfdt is used - which is also why
# flex/bison are NOT needed).
# Runtime firmware: seabios (bios-256k.bin, vgabios), ipxe-qemu (NIC ROMs).
# For 10.0: python3-venv (the venv for meson and pycotap), xz-utils and
# bzip2 (the tarball, the edk2 stand-ins).
PKGS=(build-essential dpkg-dev pkg-config ninja-build meson python3
      libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev
      seabios ipxe-qemu python3-venv xz-utils bzip2)
MISSING=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep '^install ok installed$' >/dev/null \
        || MISSING+=("$p")
done
if [[ $NEED_UPDATE -eq 1 || ${#MISSING[@]} -gt 0 ]] \
        || [[ -z "$SERIES" && -z "$(apt-cache showsrc qemu 2>/dev/null)" ]]; then
    log "apt-get update"
    run "${SUDO[@]}" apt-get update
fi
if [[ ${#MISSING[@]} -gt 0 ]]; then
    log "installing: ${MISSING[*]}"
    run "${SUDO[@]}" apt-get install -y --no-install-recommends "${MISSING[@]}"
fi

# --- 3. Source --------------------------------------------------------------------
mkdir -p "$WORK/dl"
if [[ -z "$SERIES" ]]; then
    # Pick the Debian source version: explicit, else that of the installed
    # qemu-system-x86 (so the DWARF matches the distro binary on this host as
    # closely as possible), else the newest one apt knows.
    SRC_VERSION="${LIVEDUMP_QEMU_SRC_VERSION:-}"
    if [[ -z "$SRC_VERSION" ]]; then
        inst=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)
        if [[ -n "$inst" ]] && apt-cache showsrc qemu 2>/dev/null \
                | grep -xF "Version: $inst" >/dev/null; then
            SRC_VERSION="$inst"
        fi
    fi
    # (As root apt warns that it downloads "unsandboxed" because _apt cannot
    # write to the private work dir; that is harmless.)
    log "apt-get source qemu${SRC_VERSION:+=$SRC_VERSION}"
    (cd "$WORK/dl" && run apt-get source --download-only "qemu${SRC_VERSION:+=$SRC_VERSION}")
    DSC=$(ls "$WORK"/dl/qemu_*.dsc)
    # dpkg-source -x unpacks the orig tarball and applies debian/patches.
    run dpkg-source -x "$DSC" "$WORK/src"
    SRC_VERSION=$(cd "$WORK/src" && dpkg-parsechangelog -S Version)
    PKGVERSION="Debian $SRC_VERSION, livedump debug build"
else
    log "QEMU $SERIES's source tarball from bookworm-backports (integration/qemus.py)"
    (cd "$REPO" && run python3 -m integration.qemus --source "$WORK/dl")
    TARBALL=$(ls "$WORK"/dl/qemu_*.orig.tar.xz)
    mkdir "$WORK/src"
    run tar -xf "$TARBALL" -C "$WORK/src" --strip-components=1
    SRC_VERSION="$(basename "$TARBALL" .orig.tar.xz)"
    SRC_VERSION="${SRC_VERSION#qemu_}"
    PKGVERSION="upstream $SRC_VERSION of bookworm-backports, livedump debug build"
fi
if [[ -f "$WORK/src/pythondeps.toml" ]]; then
    # Empty stand-ins for the edk2 images pc-bios/meson.build unpacks.
    for fd in $(grep -o "'edk2-[^']*\.fd'" "$WORK/src/pc-bios/meson.build" | tr -d "'"); do
        [[ -e "$WORK/src/pc-bios/$fd.bz2" ]] || bzip2 -c </dev/null >"$WORK/src/pc-bios/$fd.bz2"
    done
    # The meson and pycotap QEMU names in pythondeps.toml, from PyPI.
    mapfile -t PYDEPS < <(python3 - "$WORK/src/pythondeps.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    for name, spec in tomllib.load(f)["meson"].items():
        print(f"{name}=={spec['installed']}")
PY
)
    log "venv with ${PYDEPS[*]} from PyPI"
    run python3 -m venv "$WORK/pyvenv"
    run "$WORK/pyvenv/bin/python3" -m pip install --disable-pip-version-check "${PYDEPS[@]}"
fi
log "source: qemu $SRC_VERSION ($(cat "$WORK/src/VERSION"))"

# --- 4. Configure ---------------------------------------------------------------
# Debian's own compiler/linker flags (-g -O2 -fstack-protector-strong,
# _FORTIFY_SOURCE, relro/now ...), as its package build uses them.
# (Run in the source dir: -ffile-prefix-map maps $PWD to "." in the DWARF.)
CFLAGS_DEB="$(cd "$WORK/src" && dpkg-buildflags --get CFLAGS) $(dpkg-buildflags --get CPPFLAGS)"
LDFLAGS_DEB="$(dpkg-buildflags --get LDFLAGS) -Wl,--as-needed"
if [[ -z "$SERIES" ]]; then
    SOURCE_OPTIONS=(--firmwarepath=/usr/share/seabios:/usr/lib/ipxe/qemu)
else
    SOURCE_OPTIONS=(--firmwarepath=/usr/lib/ipxe/qemu)
fi
if [[ -f "$WORK/src/pythondeps.toml" ]]; then
    SOURCE_OPTIONS+=(--python="$WORK/pyvenv/bin/python3")
else
    SOURCE_OPTIONS+=(--with-git-submodules=ignore)
fi

mkdir -p "$WORK/src/build"
log "configure"
T_BUILD0=$(date +%s)
(cd "$WORK/src/build" && run ../configure \
    --prefix="$CACHE" \
    --with-pkgversion="$PKGVERSION" \
    --extra-cflags="$CFLAGS_DEB" \
    --extra-ldflags="$LDFLAGS_DEB" \
    --target-list=x86_64-softmmu \
    --without-default-features \
    --enable-kvm \
    --enable-tcg \
    --enable-debug-info \
    --disable-strip \
    --enable-fdt=system \
    --disable-install-blobs \
    "${SOURCE_OPTIONS[@]}")

mkdir -p "$WORK/firmware"
if [[ -f "$WORK/src/debian/optionrom.mak" ]]; then
    # x86 option ROMs (kvmvapic.bin, linuxboot_dma.bin, multiboot*.bin, pvh.bin).
    # QEMU's configure only builds them if "cc -m32 ... -lgcc" links, which needs
    # gcc-multilib; Debian instead builds them with its own debian/optionrom.mak
    # (plain cc -m16 + ld -m elf_i386), whose output is byte-identical to the
    # files in qemu-system-data. Do the same - first, as it takes seconds.
    log "building x86 option ROMs (debian/optionrom.mak)"
    mkdir -p "$WORK/optionrom"
    run make -f "$WORK/src/debian/optionrom.mak" -C "$WORK/optionrom" SRC_PATH="$WORK/src" all
    for rom in "${OPTION_ROMS[@]}"; do
        if [[ -f "$WORK/optionrom/$rom" ]]; then cp "$WORK/optionrom/$rom" "$WORK/firmware/"; fi
    done
else
    # The fetched QEMU 10.0's option ROMs and SeaBIOS (fetching it if need be).
    log "firmware of QEMU $SERIES (integration/qemus.py)"
    mapfile -t FIRMWARE_DIRS < <(cd "$REPO" && python3 -m integration.qemus --firmware)
    [[ ${#FIRMWARE_DIRS[@]} -gt 0 ]] || die "integration/qemus.py --firmware named no directory"
    for d in "${FIRMWARE_DIRS[@]}"; do
        for f in "${OPTION_ROMS[@]/#/$d/}" "$d"/bios*.bin "$d"/vgabios*.bin; do
            if [[ -e "$f" && ! -e "$WORK/firmware/${f##*/}" ]]; then
                cp -L "$f" "$WORK/firmware/"
            fi
        done
    done
    [[ -e "$WORK/firmware/bios-256k.bin" ]] || die "no SeaBIOS in ${FIRMWARE_DIRS[*]}"
fi

# --- 5. Build & stage-install -----------------------------------------------
# Only what gets installed (the binary, trace-events-all): "make" would also
# build QEMU's unit tests and helpers, a third of the work.
BUILD="$WORK/src/build"
MESON=$(sed -n 's/^MESON=//p' "$BUILD/config-host.mak")
[[ -x "$MESON" ]] || die "no MESON= in $BUILD/config-host.mak"
mapfile -t TARGETS < <("$MESON" introspect --installed "$BUILD" | python3 -c '
import json, os, sys
build = sys.argv[1] + "/"
for built in json.load(sys.stdin):  # the others are installed from the source tree
    if built.startswith(build):
        print(os.path.relpath(built, build))
' "$BUILD")
[[ " ${TARGETS[*]} " == *" ${BIN_REL##*/} "* ]] || die "meson installs no ${BIN_REL##*/}"
JOBS=$(nproc)
log "nice -n 10 ninja -j$JOBS ${TARGETS[*]} (this takes a while)"
run nice -n 10 ninja -C "$BUILD" -j"$JOBS" "${TARGETS[@]}"
T_BUILD1=$(date +%s)
log "build took $((T_BUILD1 - T_BUILD0)) s"

STAGE_ROOT="$WORK/destdir"
STAGE="$STAGE_ROOT$CACHE"
run "$MESON" install -C "$BUILD" --no-rebuild --destdir "$STAGE_ROOT"
# The firmware goes to the data dir ($CACHE/share/qemu), which QEMU
# searches after the --firmwarepath dirs.
mkdir -p "$STAGE/share/qemu"
for rom in "${OPTION_ROMS[@]}"; do
    [[ -f "$WORK/firmware/$rom" ]] || die "option ROM $rom was not built or found"
done
install -m 0644 "$WORK"/firmware/*.bin "$STAGE/share/qemu/"
STAGED_BIN="$STAGE/$BIN_REL"
[[ -x "$STAGED_BIN" ]] || die "install did not produce $BIN_REL"

# --- 6. Verify the staged binary ---------------------------------------------
log "verifying $STAGED_BIN"
"$STAGED_BIN" --version >&2

# 6a. DWARF present and contains the types/variables livedump needs.
# (grep reads all input - no 'grep -q' early exit + SIGPIPE under pipefail)
readelf -S -W "$STAGED_BIN" | grep '\.debug_info' >/dev/null || die "no .debug_info section"
readelf -s -W "$STAGED_BIN" | awk '$8=="address_space_memory"{f=1} END{exit !f}' \
    || die "symbol address_space_memory not found"
if command -v gdb >/dev/null; then
    gdb -nx -batch -ex 'ptype struct FlatView' -ex 'ptype struct RAMBlock' \
        -ex 'whatis address_space_memory' "$STAGED_BIN" >"$WORK/gdb.out" 2>&1 || true
    cat "$WORK/gdb.out" >>"$LOG"
    grep -q 'FlatRange \*ranges;' "$WORK/gdb.out" || die "gdb: struct FlatView not found in DWARF"
    grep -q 'used_length;' "$WORK/gdb.out" || die "gdb: struct RAMBlock not found in DWARF"
    grep -q 'type = AddressSpace' "$WORK/gdb.out" || die "gdb: address_space_memory has no DWARF"
elif [[ -n "$VERIFY_PYTHON" ]] && "$VERIFY_PYTHON" -c 'import elftools' 2>/dev/null; then
    "$VERIFY_PYTHON" - "$STAGED_BIN" <<'PY' || die "pyelftools: DWARF check failed"
# Only walk the CU of physmem.c (softmmu/ in 7.2, system/ in 10.0): it
# defines address_space_memory and needs the complete FlatView/RAMBlock
# types (walking all CUs is slow).
import sys
from elftools.elf.elffile import ELFFile
want = {"FlatView", "RAMBlock", "address_space_memory"}
with open(sys.argv[1], "rb") as f:
    dw = ELFFile(f).get_dwarf_info()
    for cu in dw.iter_CUs():
        name = cu.get_top_DIE().attributes.get("DW_AT_name")
        if name is None or not name.value.decode().endswith("/physmem.c"):
            continue
        for die in cu.iter_DIEs():
            a = die.attributes
            n = a["DW_AT_name"].value.decode() if "DW_AT_name" in a else None
            if die.tag == "DW_TAG_structure_type" and "DW_AT_byte_size" in a:
                want.discard(n)          # complete (non-forward) struct
            elif die.tag == "DW_TAG_variable" and n == "address_space_memory":
                want.discard(n)
        break
print("missing in DWARF:", sorted(want)) if want else None
sys.exit(1 if want else 0)
PY
else
    log "WARNING: neither gdb nor pyelftools available; skipped DWARF type check"
fi

# 6b. Run it: q35, paused, QMP on a unix socket; check query-status,
# query-kvm, HMP 'info mtree -f', and that -device loader wrote guest RAM.
RUNDIR="$(mktemp -d "${TMPDIR:-/tmp}/livedump-qemu-verify.XXXXXX")"  # short path for the socket
SOCK="$RUNDIR/qmp.sock"
ACCEL=(-accel tcg)
if [[ -r /dev/kvm && -w /dev/kvm ]]; then ACCEL=(-accel kvm -accel tcg); fi
"$STAGED_BIN" -M q35 -m 512M -display none -S "${ACCEL[@]}" \
    -device loader,addr=0x100000,data=0x4c444d50,data-len=4 \
    -qmp "unix:$SOCK,server=on,wait=off" \
    >"$RUNDIR/qemu.out" 2>&1 &
QEMU_PID=$!
for _ in $(seq 100); do
    [[ -S "$SOCK" ]] && break
    kill -0 "$QEMU_PID" 2>/dev/null || { cat "$RUNDIR/qemu.out" >&2; die "QEMU exited early"; }
    sleep 0.1
done
[[ -S "$SOCK" ]] || die "QMP socket did not appear"

[[ -n "$VERIFY_PYTHON" ]] || die "no python3 for the QMP test"
"$VERIFY_PYTHON" - "$SOCK" >>"$LOG" 2>&1 <<'PY' || { cat "$RUNDIR/qemu.out" >&2; die "QMP smoke test failed (see $LOG)"; }
import asyncio, json, socket, sys

sock_path = sys.argv[1]

async def with_qemu_qmp():
    from qemu.qmp import QMPClient
    qmp = QMPClient("livedump-verify")
    await qmp.connect(sock_path)
    r = {}
    try:
        r["status"] = await qmp.execute("query-status")
        r["kvm"] = await qmp.execute("query-kvm")
        r["mtree"] = await qmp.execute("human-monitor-command",
                                       {"command-line": "info mtree -f"})
        r["xp"] = await qmp.execute("human-monitor-command",
                                    {"command-line": "xp /1wx 0x100000"})
    finally:
        # QEMU may close the socket before/after answering 'quit'; the
        # resulting EOF is expected, not an error.
        try:
            await qmp.execute("quit")
        except Exception:
            pass
        try:
            await qmp.disconnect()
        except (EOFError, ConnectionError):
            pass
    return r

def with_stdlib():
    # Minimal QMP client, used only if the qemu.qmp package is missing.
    s = socket.socket(socket.AF_UNIX); s.connect(sock_path)
    f = s.makefile("rw")
    def cmd(name, args=None):
        f.write(json.dumps({"execute": name, **({"arguments": args} if args else {})}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg: return msg["return"]
            if "error" in msg: raise RuntimeError(msg["error"])
    json.loads(f.readline())                      # greeting
    cmd("qmp_capabilities")
    r = {"status": cmd("query-status"), "kvm": cmd("query-kvm"),
         "mtree": cmd("human-monitor-command", {"command-line": "info mtree -f"}),
         "xp": cmd("human-monitor-command", {"command-line": "xp /1wx 0x100000"})}
    f.write(json.dumps({"execute": "quit"}) + "\n"); f.flush()
    return r

try:
    import qemu.qmp  # noqa: F401
    r = asyncio.run(with_qemu_qmp())
    print("QMP client: qemu.qmp")
except ImportError:
    r = with_stdlib()
    print("QMP client: stdlib fallback")

print("query-status:", r["status"])
print("query-kvm:", r["kvm"])
print("xp 0x100000:", r["xp"].strip())
print("info mtree -f (head):", "\n".join(r["mtree"].splitlines()[:12]))
assert r["status"]["status"] == "prelaunch", r["status"]
assert r["kvm"]["present"] is True, "KVM support not compiled in"
assert "FlatView" in r["mtree"] and "pc.ram" in r["mtree"], "unexpected info mtree -f output"
assert "4c444d50" in r["xp"].lower(), "-device loader did not write guest RAM"
PY
# QEMU quits on the QMP 'quit'; make sure it is gone.
for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$QEMU_PID" 2>/dev/null; then kill "$QEMU_PID"; fi
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=""
log "QMP smoke test ok ($(grep -m1 '^query-kvm' "$LOG"))"

# --- 7. Publish atomically ---------------------------------------------------------
T_END=$(date +%s)
printf 'source: qemu %s\nbuild (configure+make): %ss\ntotal: %ss\n' \
    "$SRC_VERSION" "$((T_BUILD1 - T_BUILD0))" "$((T_END - T_START))" >"$STAGE/BUILD-INFO"
cp "$LOG" "$STAGE/build.log"
if [[ -e "$CACHE" ]]; then
    # A previous incomplete/broken cache: move it out of the way (it is then
    # removed together with $WORK).
    mv "$CACHE" "$WORK/old-cache"
fi
mv "$STAGE" "$CACHE"
rm -f "${CACHE}.failed-build.log"
log "done in $((T_END - T_START)) s (configure+make $((T_BUILD1 - T_BUILD0)) s)"
cache_ok || die "installed binary does not run"
printf '%s\n' "$CACHE/$BIN_REL"
