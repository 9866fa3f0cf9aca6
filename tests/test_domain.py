"""Finding a libvirt domain's QEMU process by the ``-uuid`` libvirt gives it."""

import subprocess
import sys
import uuid

import pytest

from livedump.errors import MonitorError, ProcessNotFound
from livedump.libvirt.domain import PassThrough, qemu_pid


def test_a_process_that_is_not_qemu_is_not_the_domain():
    wanted = str(uuid.uuid4())
    # The same -uuid on the command line of a process that is not QEMU.
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "-uuid", wanted])
    try:
        with pytest.raises(ProcessNotFound, match=f"domain 'web1' \\(UUID {wanted}\\): no QEMU "
                           "process on this host runs it"):
            qemu_pid(wanted, "web1")
    finally:
        impostor.kill()
        impostor.wait()


@pytest.mark.parametrize("command, arguments", [
    ("dump-guest-memory", {"paging": False, "protocol": "fd:x"}),
    ("human-monitor-command", {"command-line": "dump-guest-memory /tmp/x 0 4096"}),
    ("human-monitor-command", {"command-line": "  dump-guest-memory -z /tmp/x"}),
])
def test_no_dump_is_ever_sent_through_libvirt(command, arguments):
    # Refused before libvirt is asked: the domain is not even looked at.
    with pytest.raises(MonitorError, match="never sent through libvirt"):
        PassThrough(domain=None).execute(command, arguments)  # type: ignore[arg-type]
