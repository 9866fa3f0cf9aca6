"""The package's layers, as imports: each step of the pipeline reaches only
what it needs, and a dump through the monitor loads no ptrace, DWARF,
libvirt or migration code (it starts sooner without them)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "livedump"

# What each subpackage may import at module level, besides itself and the
# top-level modules that every step shares (errors, signals, proc).
ALLOWED = {
    "vmcore": set(),
    "transfer": {"vmcore"},
    "vm": {"vmcore", "transfer"},
    "qmp": {"vm", "vmcore", "transfer"},
    "libvirt": {"qmp", "vm", "vmcore", "transfer"},
    "ptrace": {"vm", "vmcore", "transfer"},
    "live": {"qmp", "vm", "vmcore", "transfer"},
    "guest": {"vmcore", "transfer"},
    # A core file's session reads QEMU's structures as ptrace mode does.
    "coredump": {"ptrace", "vm", "vmcore", "transfer"},
}
SHARED = {"errors", "signals", "proc", "__init__", "__version__"}
# The guardian speaks QMP on the monitor connection it inherits: it reads
# whole messages as the monitor's transport does (the framing imports nothing).
EXCEPTIONS = {("vm", "livedump.qmp.framing")}


def module_imports(path: Path) -> set[str]:
    """The livedump modules ``path`` imports when it is loaded (not those a
    function imports on demand, nor those only the type checker sees)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) \
                else []:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith(
                    "livedump"):
                found.add(sub.module)
                found.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("livedump"))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_step_imports_only_the_steps_below_it(package):
    for path in sorted((PACKAGE / package).glob("*.py")):
        for name in module_imports(path):
            parts = name.split(".")[1:]
            if not parts or parts[0] in SHARED or parts[0] == package:
                continue
            if (package, ".".join(name.split(".")[:3])) in EXCEPTIONS:
                continue
            assert parts[0] in ALLOWED[package], f"{path.name} imports {name}"


def test_a_dump_through_the_monitor_loads_no_ptrace_dwarf_libvirt_core_or_migration_code():
    probe = """
import sys
import livedump.cli, livedump.dump, livedump.qmp.session, livedump.vm.session
loaded = sorted(m for m in sys.modules if m.startswith(("livedump.ptrace", "livedump.libvirt",
                "livedump.live", "livedump.coredump", "elftools", "ptrace", "libvirt")))
print(loaded)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"
