import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


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
