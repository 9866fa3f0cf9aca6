"""``python -m livedump``: fds 0-2 are made safe before anything opens a file
(see guard_standard_fds), so the rest is imported after that."""

from livedump.transfer.output import guard_standard_fds

guard_standard_fds()

from livedump.cli import main  # noqa: E402

raise SystemExit(main())
