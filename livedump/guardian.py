"""A watcher that resumes the guest if livedump dies while the guest is paused.

A SIGKILL (or an out-of-memory kill) gives livedump no chance to resume
the guest. So before pausing, livedump starts this small process and keeps
it told over a pipe. If the pipe ends while livedump's last word was
"paused", livedump died mid-dump, and the watcher resumes the guest the way
it was paused: ``cont`` on the QMP connection it inherited (which stays open
as long as the watcher holds it, so QEMU never even sees livedump go), or
libvirt's resume for a libvirt domain.

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
_REPLY_TIMEOUT = 10.0


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
        os.write(self._pipe, PAUSED)

    def resumed(self) -> None:
        os.write(self._pipe, RESUMED)

    def rescue(self) -> bool:
        """Let the watcher try to resume the guest on its own connection now; whether it worked."""
        return self.close() == 0

    def close(self) -> int:
        """End the watcher (which resumes the guest if last told "paused"); its status."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        return self._process.wait()

    def __enter__(self) -> "Guardian":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watch(parent: int, pipe_fd: int, how: list[str]) -> int:
    state = RESUMED
    while chunk := os.read(pipe_fd, 64):
        state = chunk[-1:]
    if state != PAUSED:
        return 0
    if how[0] == "libvirt":
        from .domain import resume_if_paused

        status = 0 if resume_if_paused(*how[1:]) else 1
    else:
        try:
            status = _cont(int(how[1]))
        except OSError:
            return 1  # The monitor is gone (and QEMU with it, most likely).
    if status == 0 and os.getppid() != parent:  # Else livedump lives and reports it.
        print("livedump: died while the guest was paused; its guardian resumed the guest",
              file=sys.stderr)
    return status


def _cont(monitor_fd: int) -> int:
    os.write(monitor_fd, json.dumps({"execute": "cont", "id": "livedump-guardian"}).encode())
    # Wait for QEMU's answer (other replies and events may come first).
    deadline = time.monotonic() + _REPLY_TIMEOUT
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([monitor_fd], [], [], deadline - time.monotonic())
        if not ready or not (data := os.read(monitor_fd, 65536)):
            break
        buffer += data
        if b'"livedump-guardian"' in buffer:
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
