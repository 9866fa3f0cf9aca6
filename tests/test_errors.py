"""The exit codes are defined once, in errors.py; --help and the README follow."""

import re
import subprocess
import sys
from pathlib import Path

from livedump.errors import LivedumpError, exit_codes

README = Path(__file__).resolve().parents[1] / "README.md"


def test_each_error_class_has_its_own_code_and_meaning():
    seen: dict[int, type] = {}
    pending = [LivedumpError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ != LivedumpError.__module__:
            continue  # A finer kind of one of these, elsewhere, shares its code.
        assert cls.exit_code not in seen, (cls, seen.get(cls.exit_code))
        seen[cls.exit_code] = cls
        assert cls.meaning and "\n" not in cls.meaning


def test_help_lists_every_exit_code():
    out = subprocess.run([sys.executable, "-m", "livedump", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for code, meaning in exit_codes():
        assert re.search(rf"^ +{code} +{re.escape(meaning)}$", out, re.M), (code, meaning)


def test_readme_table_has_every_exit_code_and_no_other():
    text = README.read_text()
    table = text[text.index("## Exit codes"):]
    table = table[:table.index("\n## ", 1)]
    codes = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert codes == {code for code, _ in exit_codes()}
