"""Find the DWARF of the QEMU that runs: in the binary, beside it, or from debuginfod.

In gdb's order: ``--debug-file``; the executable itself; a file by build-id
under :data:`DEBUG_DIRS`; the file ``.gnu_debuglink`` names (CRC checked);
a debuginfod server when ``DEBUGINFOD_URLS`` is set, with elfutils' cache
layout so its client and this one share downloads. The running binary's
build-id decides: a debug file of another build is refused, never used.
"""

import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection
from elftools.elf.segments import NoteSegment

from livedump import __version__
from livedump.errors import DebugInfoError, PermissionDenied
from livedump.transfer.output import replacing

# gdb's debug-file-directory: separate debug files by build-id and by
# .gnu_debuglink live under it. A list so tests can point it elsewhere.
DEBUG_DIRS: list[Path] = [Path("/usr/lib/debug")]


_DEBUGINFOD_TIMEOUT = 10  # seconds without progress; DEBUGINFOD_TIMEOUT overrides
_DEBUGINFOD_MISS_SECONDS = 600  # elfutils' default for remembering a "not found"


def find_debug_file(exe: str, explicit: str | None = None) -> Path:
    """The file with the DWARF of the running binary ``exe``.

    In gdb's order: ``explicit`` (``--debug-file``); ``exe`` itself; a file
    by build-id under :data:`DEBUG_DIRS`; the file ``.gnu_debuglink`` names
    (beside ``exe``, in its ``.debug/``, under :data:`DEBUG_DIRS`), if its
    CRC matches; debuginfod, if ``DEBUGINFOD_URLS`` is set. A file whose
    build-id is not the running binary's is refused, never used.
    """
    build_id = read_build_id(exe)
    if explicit is not None:
        return check_build_id(Path(explicit), build_id)
    with open_elf(exe) as elf:
        if _has_dwarf(elf):
            return Path(exe)
        link = elf.get_dwarf_link()
    notes: list[str] = []
    for path in _build_id_paths(build_id):
        if path.is_file():
            return check_build_id(path, build_id)
    if link is not None:
        found = _from_debuglink(exe, os.fsdecode(link.filename), link.checksum, notes)
        if found is not None:
            return check_build_id(found, build_id)
    if build_id:
        found = _fetch_debuginfod(build_id, notes)
        if found is not None:
            return check_build_id(found, build_id)
    raise DebugInfoError(
        f"no debug info for {_on_disk(exe)} (build-id {build_id or 'none'}): install its "
        "debug symbols (the distribution's -dbgsym or -dbg package, e.g. "
        "qemu-system-x86-dbgsym), set DEBUGINFOD_URLS, or pass --debug-file"
        + "".join(f"; {n}" for n in notes))


def read_build_id(path: str | Path) -> str | None:
    """The GNU build-id of an ELF file, as lowercase hex (None if it has none)."""
    with open_elf(path) as elf:
        return _build_id(elf)


@contextmanager
def open_elf(path: str | Path) -> Iterator[ELFFile]:
    """An open ELF file; failures as livedump errors (permission, not ELF)."""
    try:
        with open(path, "rb") as f:
            yield ELFFile(f)
    except PermissionError:
        raise PermissionDenied(f"may not read {path}") from None
    except OSError as e:
        raise DebugInfoError(f"cannot read {path}: {e.strerror}") from None
    except ELFError as e:
        raise DebugInfoError(f"{path} is not a usable ELF file ({e})") from None


def _build_id(elf: ELFFile) -> str | None:
    """From the note sections, else (a file with no section headers) the note segments."""
    holders: Sequence[NoteSection | NoteSegment] = (
        [s for s in elf.iter_sections() if isinstance(s, NoteSection)]
        or [s for s in elf.iter_segments() if isinstance(s, NoteSegment)])
    for holder in holders:
        for note in holder.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                build_id: str = note["n_desc"]  # pyelftools gives this note's bytes in hex
                return build_id
    return None


def _has_dwarf(elf: ELFFile) -> bool:
    section = elf.get_section_by_name(".debug_info") or elf.get_section_by_name(".zdebug_info")
    return section is not None and section["sh_type"] != "SHT_NOBITS" and section["sh_size"] > 0


def check_build_id(path: Path, build_id: str | None) -> Path:
    """``path`` if it has DWARF for the binary with ``build_id``; else refuse it."""
    with open_elf(path) as elf:
        if not _has_dwarf(elf):
            raise DebugInfoError(f"{path} has no DWARF debug info")
        found = _build_id(elf)
    if build_id is not None and found != build_id:
        raise DebugInfoError(f"{path} is the debug info of build-id {found or 'none'}, "
                             f"not of the running QEMU's {build_id}: refusing it")
    return path


def _build_id_paths(build_id: str | None) -> list[Path]:
    if not build_id or len(build_id) < 3:
        return []
    return [d / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug" for d in DEBUG_DIRS]


def _on_disk(exe: str) -> Path:
    """Where the binary is (for ``/proc/PID/exe``, the link's target, even if deleted)."""
    return Path(os.path.realpath(exe).removesuffix(" (deleted)"))


def _from_debuglink(exe: str, name: str, crc: int, notes: list[str]) -> Path | None:
    where = _on_disk(exe).parent
    candidates = [where / name, where / ".debug" / name]
    candidates += [d / where.relative_to(where.anchor) / name for d in DEBUG_DIRS]
    for path in candidates:
        if path.is_file():
            if _crc32(path) == crc:
                return path
            notes.append(f"{path} does not match the CRC in .gnu_debuglink")
    return None


def _crc32(path: Path) -> int:
    crc = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
    except PermissionError:
        raise PermissionDenied(f"may not read {path}") from None
    return crc


def debuginfod_cache_dir() -> Path:
    """elfutils' client cache, so livedump and gdb share what either fetched:
    ``$DEBUGINFOD_CACHE_PATH``, else an existing ``~/.debuginfod_client_cache``,
    else ``${XDG_CACHE_HOME:-~/.cache}/debuginfod_client``."""
    if os.environ.get("DEBUGINFOD_CACHE_PATH"):
        return Path(os.environ["DEBUGINFOD_CACHE_PATH"])
    home = Path(os.environ.get("HOME") or "/")
    if (home / ".debuginfod_client_cache").exists():
        return home / ".debuginfod_client_cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "debuginfod_client"


def _fetch_debuginfod(build_id: str, notes: list[str]) -> Path | None:
    """The debug file for ``build_id`` from the servers in ``DEBUGINFOD_URLS``
    (tried in turn), kept in the cache as elfutils' client keeps it:
    ``<cache>/<build-id>/debuginfo``, mode 0400; an empty file there records
    that no server had it, and is believed for ``cache_miss_s`` seconds.
    Why nothing came is appended to ``notes``."""
    urls = list(dict.fromkeys(os.environ.get("DEBUGINFOD_URLS", "").split()))
    if not urls:
        return None
    cache = debuginfod_cache_dir()
    target = cache / build_id / "debuginfo"
    state = _cache_entry(target, cache)
    if state is not None:
        if not state:
            notes.append(f"debuginfod had no {build_id} (remembered in {target})")
        return target if state else None
    not_found = 0
    for url in urls:
        try:
            _download(f"{url.rstrip('/')}/buildid/{build_id}/debuginfo", target, _timeout(),
                      build_id)
            return target
        except urllib.error.HTTPError as e:
            notes.append(f"debuginfod {url}: HTTP {e.code}")
            not_found += 1
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError,
                DebugInfoError) as e:
            notes.append(f"debuginfod {url}: {getattr(e, 'reason', None) or e}")
    if not_found == len(urls):
        _remember_miss(target)
    return None


def _cache_entry(target: Path, cache: Path) -> bool | None:
    """True: downloaded before; False: a recent "not found"; None: ask the servers."""
    try:
        st = target.stat()
    except OSError:
        return None
    if st.st_size > 0:
        return True
    try:
        keep = int((cache / "cache_miss_s").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        keep = _DEBUGINFOD_MISS_SECONDS
    if time.time() - st.st_mtime <= keep:
        return False
    with suppress(OSError):
        target.unlink()
    return None


def _timeout() -> float:
    try:
        return float(os.environ.get("DEBUGINFOD_TIMEOUT") or _DEBUGINFOD_TIMEOUT)
    except ValueError:
        return _DEBUGINFOD_TIMEOUT


def _download(url: str, target: Path, timeout: float, build_id: str) -> None:
    """Fetch into the cache; what is not the ELF file asked for (a proxy's error
    page, say) is not kept."""
    request = urllib.request.Request(url, headers={"User-Agent": f"livedump/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with replacing(target, 0o400) as out:
            shutil.copyfileobj(reply, out, 1 << 20)
            out.flush()
            if read_build_id(out.name) != build_id:
                raise DebugInfoError(f"{url} sent something that is not build-id {build_id}")


def _remember_miss(target: Path) -> None:
    with suppress(OSError):  # only a hint for the next run
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.touch(exist_ok=True)


def supplementary_file(elf: ELFFile, debug_file: Path) -> Path | None:
    """The dwz common file (``.gnu_debugaltlink``) holding part of the DWARF, if any.

    Debian's -dbgsym packages are made with ``dwz -m``; the file is looked
    for where the link says, by build-id under :data:`DEBUG_DIRS`, then
    through debuginfod.
    """
    section = elf.get_section_by_name(".gnu_debugaltlink")
    if section is None:
        return None
    name, _, raw_id = section.data().partition(b"\0")
    alt_id = raw_id.hex()
    named = debug_file.parent / os.fsdecode(name)  # an absolute name stays absolute
    for path in [named, *_build_id_paths(alt_id)]:
        if path.is_file() and read_build_id(path) == alt_id:
            return path
    notes: list[str] = []
    found = _fetch_debuginfod(alt_id, notes)
    if found is not None and read_build_id(found) == alt_id:
        return found
    raise DebugInfoError(f"{debug_file} keeps part of its DWARF in {named} (build-id "
                         f"{alt_id}), which is not installed" + "".join(f"; {n}" for n in notes))

