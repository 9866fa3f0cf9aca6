"""``livedump watch``: a vmcore when the guest panics (not yet written)."""


def main(argv: list[str]) -> int:
    raise NotImplementedError
