"""A watcher that resumes the guest if livedump dies while the guest is paused.

A SIGKILL (or an out-of-memory kill) gives livedump no chance to send
``cont``. So before pausing, livedump starts this small process and hands
it the monitor connection. It sleeps on a pipe from livedump. If the pipe
ends while livedump's last word was "paused", livedump died mid-dump, and
the watcher sends ``cont`` on the inherited connection (which stays open
as long as the watcher holds it, so QEMU never even sees livedump go).

    python -m livedump.guardian MONITOR_FD PIPE_FD
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

    def __init__(self, monitor_fd: int) -> None:
        read_end, self._pipe = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "livedump.guardian", str(monitor_fd), str(read_end)],
                pass_fds=(monitor_fd, read_end), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        finally:
            os.close(read_end)

    def paused(self) -> None:
        """Said before ``stop`` is sent: from here on, a death means resume."""
        os.write(self._pipe, PAUSED)

    def resumed(self) -> None:
        os.write(self._pipe, RESUMED)

    def rescue(self) -> bool:
        """Let the watcher try ``cont`` on its own connection now; whether it worked."""
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


def _watch(monitor_fd: int, pipe_fd: int) -> int:
    parent = os.getppid()
    state = RESUMED
    while chunk := os.read(pipe_fd, 64):
        state = chunk[-1:]
    if state != PAUSED:
        return 0
    try:
        status = _resume(monitor_fd)
    except OSError:
        return 1  # The monitor is gone (and QEMU with it, most likely).
    if status == 0 and os.getppid() != parent:  # Else livedump lives and reports it.
        print("livedump: died while the guest was paused; its guardian resumed the guest",
              file=sys.stderr)
    return status


def _resume(monitor_fd: int) -> int:
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
    sys.exit(_watch(int(sys.argv[1]), int(sys.argv[2])))
