# Before anything opens a file: see guard_standard_fds.
from .output import guard_standard_fds

guard_standard_fds()

from .cli import main

raise SystemExit(main())
