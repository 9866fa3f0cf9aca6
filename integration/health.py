"""Is the VM whole after a dump, whatever ended it? Checks from outside QEMU.

A background snapshot write-protects guest RAM with userfaultfd; one that
ends without QEMU undoing it leaves pages whose next guest write blocks a
vCPU for ever. The kernel shows such a page with bit 57 (PM_UFFD_WP) in
/proc/PID/pagemap, and a range still registered for it with ``uw`` in the
VmFlags of /proc/PID/smaps. The sweeping firmware (integration/firmware.py)
writes its memory all the time and counts its steps, so a guest blocked on
such a page stops counting.
"""

import time

from .firmware import SWEEP_COUNTER
from .vm import VM

PM_UFFD_WP = 1 << 57
# For each byte: 1 if it has the bit that PM_UFFD_WP sets in an entry's top byte.
_WP_IN_TOP_BYTE = bytes((b >> (57 - 56)) & 1 for b in range(256))


def write_protected_pages(pid: int) -> int:
    """How many pages of process ``pid`` have PM_UFFD_WP set, over all its mappings."""
    count = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            span, _, rest = line.partition(" ")
            if rest.rstrip().endswith("[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            pagemap.seek(start // 4096 * 8)
            entries = pagemap.read((end - start) // 4096 * 8)
            count += entries[7::8].translate(_WP_IN_TOP_BYTE).count(1)
    return count


def uffd_wp_mappings(pid: int) -> list[str]:
    """The mappings of process ``pid`` still registered for userfaultfd write protection."""
    found, mapping = [], ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if line.startswith("VmFlags:"):
                if "uw" in line.split()[1:]:
                    found.append(mapping)
            elif not line[0].isupper() or "-" in line.split()[0]:
                mapping = line.strip()
    return found


def counts(vm: VM) -> int:
    return vm.read_u32(SWEEP_COUNTER)


def assert_counting(vm: VM, seconds: float = 60.0) -> None:
    """The sweeping guest makes progress: its count moves, and keeps moving: 4
    samples a quarter second apart that differ from the one before (a vCPU
    thread of a loaded host may miss samples; a guest left stopped moves none)."""
    start = last = counts(vm)
    moves, samples, deadline = 0, 0, time.monotonic() + seconds
    while moves < 4:
        assert time.monotonic() < deadline, (
            f"the guest's count stalled at {last} (was {start}, moved {moves}/{samples})")
        time.sleep(0.25)
        now = counts(vm)
        samples += 1
        moves += now != last
        last = now


def assert_whole(vm: VM) -> None:
    """No page left write-protected, the guest running and counting."""
    # (Messages of their own: pytest rewrites the asserts of test modules only.)
    status = vm.status()
    assert status == "running", f"the guest is {status}"
    registered, pages = uffd_wp_mappings(vm.pid), write_protected_pages(vm.pid)
    assert not (registered or pages), (f"{pages} pages of QEMU write-protected (pagemap bit "
                                       f"57), in mappings still registered: {registered}")
    assert_counting(vm)
