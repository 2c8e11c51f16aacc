"""The house rule: imports point one way.

Every ``import`` in qatkit, top-level and function-local alike (read from the AST), must point
to the same layer or a lower one, and the module import graph must have no cycle. The layers,
lowest first, follow the workflow: base < fixed_point < quantization < distributed < doctor <
analysis < demo / export < cli; ``qatkit/__init__.py`` (the public facade) and
``qatkit/__main__.py`` stand above all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qatkit"
LAYERS = {"base": 0, "fixed_point": 1, "quantization": 2, "distributed": 3, "doctor": 4,
          "analysis": 5, "demo": 6, "export": 6, "cli": 7}
TOP = 8  # qatkit/__init__.py, qatkit/__main__.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The qatkit module an import names (``from a.b import c`` may name module a.b.c)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def imports(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "qatkit" or n.startswith("qatkit."):
                target = resolve(n, known)
                if target is not None:
                    out.append((node.lineno, target))
    return out


def layer(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return LAYERS[parts[1]]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for _, t in imports(p, known) if t != m} for m, p in known.items()}


def test_every_subpackage_has_a_layer_and_says_what_it_owns():
    for p in PKG.iterdir():
        if p.is_dir() and (p / "__init__.py").exists():
            assert p.name in LAYERS, f"qatkit/{p.name} has no layer in tests/test_layers.py"
            doc = ast.get_docstring(ast.parse((p / "__init__.py").read_text()))
            assert doc and len(doc) > 80, f"qatkit/{p.name}/__init__.py must say what it owns"


def test_the_top_level_holds_only_the_facade_and_subpackages():
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py",
                                                                       "__main__.py"))
    assert loose == []


def test_no_import_points_up_a_layer():
    known = modules()
    upward = []
    for mod, path in known.items():
        for line, target in imports(path, known):
            if layer(target) > layer(mod):
                upward.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert upward == []


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk of ``g``, as the cycle it closes."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t):], t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycle():
    assert find_cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("bad, expected", [
    ("from qatkit.doctor import guards\n", "qatkit.doctor.guards"),
    ("def f():\n    from qatkit.analysis.report import write_report\n", "qatkit.analysis.report"),
])
def test_the_layer_check_catches_an_upward_import(tmp_path, bad, expected):
    # the checker itself, on a workflow module with one upward import added
    known = modules()
    p = tmp_path / "prepare.py"
    p.write_text(bad)
    found = [t for _, t in imports(p, known) if layer(t) > layer("qatkit.quantization.prepare")]
    assert found == [expected]


def test_help_needs_no_torch():
    import subprocess
    import sys
    code = ("import sys; from qatkit.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("False")


def test_every_public_name_has_a_docstring():
    import inspect

    import qatkit
    documented = (inspect.isclass, inspect.isfunction, inspect.ismodule)
    missing = [n for n in qatkit.__all__ if any(f(getattr(qatkit, n)) for f in documented)
               and not (getattr(qatkit, n).__doc__ or "").strip()]
    assert missing == []
