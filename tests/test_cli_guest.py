"""The command line of ``livedump dmesg`` and ``watch`` next to the dump's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from livedump import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The command line of this checkout, wherever it runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "livedump", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_a_command_name_after_options_is_refused_not_written(name, tmp_path):
    r = run("--pid", "1", name, cwd=tmp_path)
    assert r.returncode == 2
    assert f"'{name}' is a command: give it first" in r.stderr
    assert f"./{name}" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_dmesg_needs_a_vm():
    r = run("dmesg")
    assert r.returncode == 2
    assert r.stderr == "livedump: name the VM with --pid, --qmp or --domain\n"


def test_dmesg_help_names_its_options():
    r = run("dmesg", "--help")
    assert r.returncode == 0
    for option in ("--pid", "--qmp", "--domain", "--pause", "--follow", "--json", "--caller"):
        assert option in r.stdout
