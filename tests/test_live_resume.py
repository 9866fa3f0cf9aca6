"""After the snapshot point: livedump resumes the guest only if QEMU shows it did not,
and times QEMU's pause by its STOP and RESUME events."""

import pytest

from livedump.live import snapshot
from livedump.live.snapshot import LiveSnapshot
from livedump.vm.pause import Pause


class Monitor:
    """QEMU's status and events after a snapshot's start, as a QEMU might show them."""

    def __init__(self, resumes_after: int | None, events: list[tuple[str, float]]) -> None:
        self.resumes_after = resumes_after  # status queries until QEMU runs the guest
        self.pending = events
        self.queries = 0
        self.sent: list[str] = []

    def running(self) -> bool:
        self.queries += 1
        return self.resumes_after is not None and self.queries > self.resumes_after

    def events(self) -> list[tuple[str, float]]:
        taken, self.pending = self.pending, []
        return taken

    def cont(self) -> None:
        self.sent.append("cont")


def resumed(monitor: Monitor) -> Pause:
    live = LiveSnapshot(monitor, "x86_64", None, None)  # type: ignore[arg-type]
    pause = Pause(was_running=True)
    live._pause = pause
    live._resumed()
    return pause


def test_qemu_resumes_the_guest_itself():
    monitor = Monitor(resumes_after=2, events=[("MIGRATION", 9.0), ("STOP", 10.0),
                                               ("RESUME", 10.0015)])
    pause = resumed(monitor)
    assert monitor.sent == []
    assert pause.seconds == pytest.approx(0.0015)


def test_a_qemu_that_leaves_the_guest_paused_is_sent_cont(monkeypatch):
    monkeypatch.setattr(snapshot, "_RESUME_GRACE", 0.05)
    monitor = Monitor(resumes_after=None, events=[("STOP", 10.0)])
    pause = resumed(monitor)
    assert monitor.sent == ["cont"]
    assert pause.stopped_at == 10.0 and pause.resumed_at > pause.stopped_at
