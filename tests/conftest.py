import json
import signal
from pathlib import Path

import pytest

from livedump import signals

DATA = Path(__file__).parent / "data"
SESSIONS = sorted((DATA / "sessions").glob("*.json"))


class ReplayTransport:
    """Answers monitor commands from a session recorded on a real QEMU
    (``integration/capture_sessions.py``); any other command is an error."""

    def __init__(self, session: dict) -> None:
        self.replies = {
            (x["execute"], json.dumps(x["arguments"], sort_keys=True)): x["return"]
            for x in session["exchanges"]
        }

    def execute(self, command, arguments=None, timeout=None):
        return self.replies[(command, json.dumps(arguments, sort_keys=True))]

    def close(self):
        pass


@pytest.fixture(params=SESSIONS, ids=[p.stem for p in SESSIONS])
def session(request) -> dict:
    return json.loads(request.param.read_text())


@pytest.fixture
def terminating_signals_raise():
    """livedump's signal handlers, as its CLI installs them; the test's put back after."""
    saved = {s: signal.getsignal(s) for s in signals.HELD}
    signals.install()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
