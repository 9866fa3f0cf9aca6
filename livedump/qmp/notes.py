"""QEMU's CPU notes, taken from QEMU itself while the guest is paused.

livedump asks QEMU for a dump of one page: the answer carries exactly the
notes QEMU's full dump would carry (a VMCOREINFO note too, when the VM has
the vmcoreinfo device), from registers QEMU synchronises with KVM first,
and its ELF header says which class, byte order and machine QEMU judges the
guest to be (an x86 guest out of long mode is EM_386). The page itself is
dropped. It goes through a memfd passed over the monitor socket, so no file
is shared with QEMU. Over TCP no descriptor can pass, but livedump runs on
QEMU's host: QEMU writes it to a file of its own in a new private
directory, which livedump reads and removes.

Where that cannot be done (libvirt's monitor pass-through passes no file
descriptors, and libvirt 9.0's daemon crashes on the completion event of a
dump it did not start), libvirt's own memory-only dump is pointed at a pipe,
which livedump closes as soon as the notes have come through: the dump then
fails, having written no guest memory anywhere.

The same cut-off whole dump gives QEMU's own RAM selection, in its program
headers, where the monitor shows no other way to it (a partly plugged
virtio-mem device's blocks): :func:`dump_header`, :func:`header_from_pipe`.
"""

import contextlib
import os
import secrets
import select
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from livedump import proc, signals
from livedump.errors import MonitorError
from livedump.qmp.monitor import Monitor
from livedump.qmp.transport import QMPTransport
from livedump.vm.guardian import release_fifo
from livedump.vmcore.notes import QemuNotes, notes_end, parse

_FD_NAME = "livedump-notes"
_HEADER_FD_NAME = "livedump-header"
_PAGE = 4096
_MAX_CORE = 1 << 24  # bytes of QEMU's one-page dump read back at most


def from_qemu(monitor: Monitor, gpa: int,
              watch: Callable[[str | None], None] | None = None) -> QemuNotes:
    """QEMU's notes for the paused guest, from a one-page dump at guest address ``gpa``.

    Into a memfd passed to QEMU; where none can pass (QMP over TCP), into a
    file of :func:`private_file`, which ``watch`` is told of as
    :func:`from_pipe` tells it of its FIFO.
    """
    transport = monitor.transport
    if isinstance(transport, QMPTransport) and not transport.passes_fds:
        assert transport.peer_pid is not None
        with private_file(transport.peer_pid, watch) as (path, fd):
            _dump_one_page(monitor, f"file:{path}", gpa)
            return parse(os.pread(fd, _MAX_CORE, 0))
    fd = os.memfd_create(_FD_NAME, os.MFD_CLOEXEC)
    try:
        monitor.send_fd(fd, _FD_NAME)
        _dump_one_page(monitor, f"fd:{_FD_NAME}", gpa)
        return parse(os.pread(fd, _MAX_CORE, 0))
    finally:
        os.close(fd)


def _dump_one_page(monitor: Monitor, protocol: str, gpa: int) -> None:
    monitor.transport.execute("dump-guest-memory", {
        "paging": False, "protocol": protocol, "begin": gpa, "length": _PAGE})


@contextlib.contextmanager
def private_file(pid: int, watch: Callable[[str | None], None] | None = None,
                 fifo: bool = False) -> Iterator[tuple[str, int]]:
    """An empty file (or a FIFO) that process ``pid`` (QEMU) may write and no
    other user may read: its path as QEMU sees it, and a descriptor to read it by.

    It is made 0600 in a new 0700 directory in QEMU's own ``/tmp`` (reached
    through ``/proc/PID/root``, so a private ``/tmp`` or a chroot is no
    obstacle), both given to QEMU's user if that is not ours. Both are
    removed on the way out, whatever the way: signals wait while they are
    made and removed, and ``watch`` (the guardian's, if given) is told the
    path meanwhile, so that even a killed livedump leaves nothing behind.
    """
    owner = _file_owner(pid)
    made: tuple[str, int] | None = None
    try:
        with signals.deferred():  # Made and known to the finally below, or not made.
            made = _make_private_file(pid, owner, watch, fifo)
        path, fd = made
        directory = os.path.dirname(path)
        yield os.path.join("/tmp", os.path.basename(directory), "notes"), fd
    finally:
        with signals.deferred():
            try:
                if made is not None:
                    _remove(*made)
            finally:
                if watch:
                    watch(None)


def _make_private_file(pid: int, owner: tuple[int, int],
                       watch: Callable[[str | None], None] | None,
                       fifo: bool) -> tuple[str, int]:
    """The file of :func:`private_file` (as we reach it), and a descriptor on it.

    ``watch`` is told each name before it is made, so there is no instant
    when a killed livedump would leave it unknown."""
    tmp = os.path.join(proc.path(pid, "root"), "tmp")
    while True:
        directory = os.path.join(tmp, f"livedump-notes-{secrets.token_hex(6)}")
        path = os.path.join(directory, "notes")
        if watch:
            watch(path)
        try:
            os.mkdir(directory, 0o700)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise MonitorError(f"cannot make a directory in /tmp of PID {pid} for QEMU's "
                               f"one-page dump: {e.strerror}") from None
    fd = -1
    try:
        os.chmod(directory, 0o700)  # Whatever the umask.
        if fifo:  # Its reader opened before QEMU opens it: QEMU's open never waits.
            os.mkfifo(path, 0o600)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        if owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *owner)
            os.chown(directory, *owner)
    except OSError as e:
        _remove(path, fd)
        raise MonitorError(f"cannot give QEMU (PID {pid}) a file for its one-page dump: "
                           f"{e.strerror}") from None
    return path, fd


def _file_owner(pid: int) -> tuple[int, int]:
    """The user and group that process ``pid`` creates files as."""
    ids = {}
    for line in proc.read_text(pid, "status", "inspect").splitlines():
        name, _, values = line.partition(":")
        if name in ("Uid", "Gid"):
            ids[name] = int(values.split()[3])  # real, effective, saved, filesystem
    return ids["Uid"], ids["Gid"]


def _remove(path: str, fd: int) -> None:
    """Remove the file ``path`` and its directory, and close ``fd`` (if open)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError as e:
        raise MonitorError(f"cannot remove {os.path.dirname(path)}, made for QEMU's "
                           f"one-page dump: {e.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def from_pipe(dump_into: Callable[[str], object], timeout: float = 10.0,
              watch: Callable[[str | None], None] | None = None) -> QemuNotes:
    """QEMU's notes from the start of a dump that ``dump_into(path)`` writes into a pipe.

    The pipe is a FIFO, which the dumper opens by name: an open for writing
    waits for a reader, forever if none comes (and libvirtd waits holding its
    domain's lock). So the name goes before the reader does, and ``watch`` is
    told the name (then None) for the guardian, which lets such an open
    through should livedump die meanwhile.
    """
    return parse(header_from_pipe(dump_into, timeout, watch))


def header_from_pipe(dump_into: Callable[[str], object], timeout: float = 10.0,
                     watch: Callable[[str | None], None] | None = None) -> bytes:
    """The headers and notes of the dump of :func:`from_pipe`, unparsed."""
    path = os.path.join(tempfile.mkdtemp(prefix="livedump-"), "notes")
    # The guardian is told the name before the FIFO is made: a livedump killed
    # at any instant leaves nothing it does not know of.
    try:
        if watch:
            watch(path)
        os.mkfifo(path, 0o600)
        # Open before the writer: no end-of-file until it has come and gone.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        release_fifo(path)
        raise
    try:
        return _cut(fd, lambda: dump_into(path), timeout,
                    lambda: release_fifo(path, fd))  # The dump fails at its next write.
    finally:
        if watch:
            watch(None)


def dump_header(monitor: Monitor, timeout: float = 10.0,
                watch: Callable[[str | None], None] | None = None) -> bytes:
    """The headers and notes of QEMU's whole dump (paging off) of the paused guest.

    Its program headers are QEMU's own RAM selection, its notes those of
    :func:`from_qemu`; it goes into a pipe passed over the monitor socket,
    whose reader is closed once the notes are in: the dump then fails at its
    next write, having given no more guest memory than the pipe holds (to
    livedump, which drops it), and leaves ``query-dump`` at "failed". A
    livedump that dies closes the reader all the same. Where no descriptor
    can pass (QMP over TCP), the pipe is a FIFO of :func:`private_file`.
    """
    transport = monitor.transport
    if isinstance(transport, QMPTransport) and not transport.passes_fds:
        assert transport.peer_pid is not None
        with private_file(transport.peer_pid, watch, fifo=True) as (path, fd):
            return _cut(fd, lambda: transport.execute("dump-guest-memory", {
                "paging": False, "protocol": f"file:{path}"}), timeout,
                lambda: _drop_reader(fd))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_end, False)  # QEMU's end blocks: it writes with no retry.
    try:
        monitor.send_fd(write_end, _HEADER_FD_NAME)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # QEMU's copy is the only writer.
    return _cut(read_end, lambda: transport.execute("dump-guest-memory", {
        "paging": False, "protocol": f"fd:{_HEADER_FD_NAME}"}), timeout,
        lambda: os.close(read_end))


def _drop_reader(fd: int) -> None:
    """Close the pipe that ``fd`` reads, keeping the number open (on /dev/null)
    for its owner to close: the writer fails at its next write."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _cut(fd: int, dump: Callable[[], object], timeout: float,
         release: Callable[[], None]) -> bytes:
    """What ``dump()``, run meanwhile, writes into the pipe ``fd``, up to the end of
    its notes; ``release`` then closes ``fd`` so that the dump fails."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            dump()
        except Exception as e:  # Expected once the pipe is closed; else the reason.
            failure.append(e)

    worker = threading.Thread(target=run, name="livedump-notes", daemon=True)
    try:
        with signals.deferred():  # Signals are for the main thread, as ever.
            worker.start()
        core = _read_notes(fd, worker, time.monotonic() + timeout)
    finally:
        release()
        worker.join(timeout)
    if core is None:
        raise MonitorError(f"no dump came through the pipe{f' ({failure[0]})' if failure else ''}")
    return core


def _read_notes(fd: int, worker: threading.Thread, deadline: float) -> bytes | None:
    """The dump's first bytes, up to the end of its PT_NOTE (None if it never wrote)."""
    core = b""
    while (end := notes_end(core)) is None or len(core) < end:
        left = deadline - time.monotonic()
        if left <= 0 or not (worker.is_alive() or select.select([fd], [], [], 0)[0]):
            return None
        if select.select([fd], [], [], min(left, 0.1))[0]:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                return None
            core += chunk
    return core
