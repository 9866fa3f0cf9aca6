"""Finding a libvirt domain's QEMU process by the ``-uuid`` libvirt gives it."""

import subprocess
import sys
import uuid

import pytest

from livedump.domain import qemu_pid
from livedump.errors import ProcessNotFound


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
