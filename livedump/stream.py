"""Copy guest memory into the vmcore, block after block, in large chunks."""

from .elfcore import CoreLayout
from .output import Output
from .procmem import ProcessMemory

CHUNK = 8 << 20


def stream(layout: CoreLayout, memory: ProcessMemory, out: Output) -> None:
    """Write the header, then every block's memory, front to back.

    One buffer is reused throughout, so memory use does not grow with the guest.
    """
    out.write(layout.header)
    view = memoryview(bytearray(CHUNK))
    for block in layout.blocks:
        for done in range(0, block.size, CHUNK):
            chunk = view[: min(CHUNK, block.size - done)]
            memory.read_into(chunk, block.hva + done)
            out.write(chunk)
