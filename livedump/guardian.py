"""A watcher that resumes the guest if livedump dies while the guest is paused.

A SIGKILL (or an out-of-memory kill) gives livedump no chance to resume
the guest. So before pausing, livedump starts this small process and keeps
it told over a pipe. If the pipe ends while livedump's last word was
"paused", livedump died mid-dump, and the watcher resumes the guest the way
it was paused: ``cont`` on the QMP connection it inherited (which stays open
as long as the watcher holds it, so QEMU never even sees livedump go), or
libvirt's resume for a libvirt domain. Likewise for QEMU's migration
settings that ``--live`` changed (QMP only): if livedump dies before it has
put them back, the watcher ends the migration and puts them back.

Likewise for a FIFO that libvirt's dump is told to open (for QEMU's CPU
notes): with livedump gone, libvirtd's open of it would wait for a reader
forever, holding the domain; the watcher opens it, and lets it go.

Messages on the pipe are lines: ``P`` (paused), ``R`` (resumed), ``S``
and a JSON list of ``[command, arguments]`` (what puts the settings
back), ``D`` (they are back), ``F`` and a FIFO's path (``F`` alone: no
FIFO any more).

    python -m livedump.guardian LIVEDUMP_PID PIPE_FD qmp MONITOR_FD
    python -m livedump.guardian LIVEDUMP_PID PIPE_FD libvirt URI UUID
"""

import json
import os
import select
import subprocess
import sys
import time

PAUSED = b"P"
RESUMED = b"R"
SETTINGS = b"S"
RESTORED = b"D"
FIFO = b"F"
_REPLY_TIMEOUT = 10.0
_MIGRATION_END_TIMEOUT = 30.0
# Migration states in which no migration is under way (``query-migrate``).
MIGRATION_IDLE = frozenset({"none", "completed", "failed", "cancelled"})


class Guardian:
    """livedump's side: start the watcher, and keep it told."""

    def __init__(self, how: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        read_end, self._pipe = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "livedump.guardian", str(os.getpid()), str(read_end),
                 *how],
                pass_fds=(read_end, *pass_fds), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        finally:
            os.close(read_end)

    @classmethod
    def over_qmp(cls, monitor_fd: int) -> "Guardian":
        """A guardian that sends ``cont`` on the QMP connection ``monitor_fd``."""
        return cls(["qmp", str(monitor_fd)], (monitor_fd,))

    @classmethod
    def over_libvirt(cls, uri: str, uuid: str) -> "Guardian":
        """A guardian that has libvirt at ``uri`` resume the domain ``uuid``."""
        return cls(["libvirt", uri, uuid])

    def paused(self) -> None:
        """Said before the guest is paused: from here on, a death means resume."""
        self._say(PAUSED)

    def resumed(self) -> None:
        self._say(RESUMED)

    def restore_on_death(self, commands: list[tuple[str, dict[str, object]]]) -> None:
        """Said before QEMU's migration settings are changed: how to put them back."""
        self._say(SETTINGS + json.dumps(commands).encode())

    def restored(self) -> None:
        self._say(RESTORED)

    def fifo(self, path: str | None) -> None:
        """Said while a dump may open the FIFO ``path`` (None: no longer)."""
        self._say(FIFO + (path or "").encode())

    def _say(self, message: bytes) -> None:
        if self._pipe >= 0:  # (Not after a rescue: the watcher is gone.)
            os.write(self._pipe, message + b"\n")

    def rescue(self) -> bool:
        """Let the watcher try to resume the guest on its own connection now; whether it worked."""
        return self.close() == 0

    def close(self) -> int:
        """End the watcher (which resumes the guest if last told "paused", and puts
        the settings back if not told they are); its status."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        return self._process.wait()


def _watch(parent: int, pipe_fd: int, how: list[str]) -> int:
    said = b""
    while chunk := os.read(pipe_fd, 65536):
        said += chunk
    paused, settings, fifo = False, None, ""
    for line in said.splitlines():
        if line in (PAUSED, RESUMED):
            paused = line == PAUSED
        elif line.startswith(SETTINGS):
            settings = json.loads(line[1:])
        elif line == RESTORED:
            settings = None
        elif line.startswith(FIFO):
            fifo = os.fsdecode(line[1:])
    if fifo:
        release_fifo(fifo)
    if not paused and settings is None:
        return 0
    if how[0] == "libvirt":
        from .domain import resume_if_paused

        if not resume_if_paused(*how[1:]):
            return 1
    else:
        monitor = _Monitor(int(how[1]))
        try:
            if paused and monitor.execute("cont") is None:
                return 1
            if settings is not None and not _restore(monitor, settings):
                return 1
        except OSError:
            return 1  # The monitor is gone (and QEMU with it, most likely).
    if os.getppid() != parent:  # Else livedump lives and reports it.
        print("livedump: died while " + ("the guest was paused" if paused else
                                        "QEMU's migration settings were changed") +
              "; its guardian " + ("resumed the guest" if paused else "put them back"),
              file=sys.stderr)
    return 0


def release_fifo(path: str, fd: int = -1) -> None:
    """Remove the FIFO ``path`` (and the directory made for it), and close its
    reader ``fd``, opened here if not given: a writer waiting in open() is let
    through, and fails at its first write. The name goes first, so that no
    open can start once no reader is left."""
    if fd < 0:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass  # Gone already: no open can be waiting on it.
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
    if fd >= 0:
        os.close(fd)


def _restore(monitor: "_Monitor", settings: list[tuple[str, dict[str, object]]]) -> bool:
    """End livedump's migration, then put the settings back (they cannot change
    while a migration is under way)."""
    monitor.execute("migrate_cancel")
    deadline = time.monotonic() + _MIGRATION_END_TIMEOUT
    while True:
        reply = monitor.execute("query-migrate")
        if reply is None:
            return False
        if reply.get("return", {}).get("status", "none") in MIGRATION_IDLE:
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return all(monitor.execute(command, arguments) is not None
               for command, arguments in settings)


class _Monitor:
    """QMP on the inherited connection: one command at a time, its reply picked
    out of whatever else QEMU sends (events, replies meant for livedump)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self._count = 0

    def execute(self, command: str, arguments: dict[str, object] | None = None
                ) -> dict | None:
        self._count += 1
        tag = f"livedump-guardian-{self._count}"
        message: dict[str, object] = {"execute": command, "id": tag}
        if arguments:
            message["arguments"] = arguments
        os.write(self.fd, json.dumps(message).encode())
        deadline = time.monotonic() + _REPLY_TIMEOUT
        while time.monotonic() < deadline:
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == tag:
                    return reply
            ready, _, _ = select.select([self.fd], [], [], deadline - time.monotonic())
            if not ready or not (data := os.read(self.fd, 65536)):
                break
            self._buffer += data
        return None


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
