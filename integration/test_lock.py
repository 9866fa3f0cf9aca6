"""The VM's dump lock: only a user who may dump the VM can hold it, and its holder is named.

(Two livedumps of one VM: test_faults.test_second_livedump_on_the_same_vm_is_refused.)
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import livedump
from .counting import assert_counts
from .vm import COUNTING_PC, VM

# Takes every lock on the VM it can think of, says what it got, and holds
# it until its standard input closes.
SQUATTER = r"""
import fcntl, os, socket, sys
pid = int(sys.argv[1])
with open(f"/proc/{pid}/stat") as f:
    start = f.read().rpartition(")")[2].split()[19]
held = []
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(f"\0livedump-{pid}-{start}".encode())  # the name livedump's lock had
s.listen(1)
held.append("socket")
for path in (f"/proc/{pid}/mem", f"/proc/{pid}/task/{pid}/mem"):
    try:
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(path)
    except OSError as e:
        held.append(f"{path}: {e.strerror}")
print(*held, sep="; ", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def vm() -> Iterator[VM]:
    with VM(memory="64M", platform=COUNTING_PC) as vm:
        yield vm


def holding(*command: str) -> subprocess.Popen:
    """``command`` started with a pipe for input: it holds what it took until that closes."""
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_unprivileged_user_cannot_block_a_dump(vm: VM, scratch: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    squatter = holding("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       sys.executable, "-c", SQUATTER, str(vm.pid))
    try:
        assert squatter.stdout is not None
        said = squatter.stdout.readline().decode()
        # It could take the old lock's name, not the file the lock is now on.
        assert said == (f"socket; /proc/{vm.pid}/mem: Permission denied; "
                        f"/proc/{vm.pid}/task/{vm.pid}/mem: Permission denied\n")
        r = livedump("--pid", str(vm.pid), str(scratch / "x.vmcore"))
        assert r.returncode == 0, r.stderr
        assert (scratch / "x.vmcore").read_bytes()[:4] == b"\x7fELF"
    finally:
        squatter.communicate(timeout=10)
    assert_counts(vm)


def test_a_holder_that_is_not_livedump_is_named_so(vm: VM, scratch: Path) -> None:
    """Only a process that may read QEMU's memory can hold the lock; it is named for
    what it is, and once it lets go, the dump goes ahead."""
    holder = holding(sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); sys.stdin.read()"),
        f"/proc/{vm.pid}/mem")
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        r = livedump("--pid", str(vm.pid), str(scratch / "x.vmcore"))
        assert r.returncode == 12
        assert r.stderr == (
            f"livedump: PID {holder.pid} ({os.path.basename(sys.executable)}), which is not "
            f"livedump, holds the dump lock of QEMU PID {vm.pid} (an flock on "
            f"/proc/{vm.pid}/mem)\n").encode()
        assert os.listdir(scratch) == []
        assert_counts(vm)
    finally:
        holder.communicate(timeout=10)
    r = livedump("--pid", str(vm.pid), str(scratch / "x.vmcore"))
    assert r.returncode == 0, r.stderr
    assert_counts(vm)
