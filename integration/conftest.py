import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

OPT_IN = {"analysis": "needs an 858 MB download; run with -m analysis"}


def pytest_collection_modifyitems(config, items):
    """Tests of an opt-in tier run only when ``-m`` names it."""
    chosen = config.getoption("markexpr") or ""
    for name, why in OPT_IN.items():
        if name not in chosen:
            for item in items:
                if name in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def scratch():
    """A directory for vmcores: on tmpfs where there is one, as dumps are large."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="livedump-test-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def livedump(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "livedump", *args], stderr=subprocess.PIPE,
                          timeout=timeout, **kwargs)
