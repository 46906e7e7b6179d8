"""The shape of the code: presets that compose, size limits (the import layers: test_imports.py)."""

from __future__ import annotations

import ast

import yaml

from conftest import run_cli
from lsn_exp import CONF_DIR, REPO_ROOT

PACKAGE = REPO_ROOT / "lsn_exp"
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 150, 60
# "lsn_exp/path.py::Qual.name" (or "lsn_exp/path.py" for a module) -> why it may be larger.
EXCEPTIONS: dict[str, str] = {}


def test_every_experiment_preset_dry_runs(tmp_path):
    """Every conf/experiment preset composes and dry-runs in one glob sweep, one job per preset."""
    out = run_cli("-m", "+experiment=glob(*)", "dry_run=true", f"hydra.sweep.dir={tmp_path}", "logger=none",
                  timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    overrides = {job.name: yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs}
    assert all((job / "dry_run.txt").is_file() for job in jobs)
    # Hydra builds the sweep from the primary config without the swept `+experiment`, so a preset's own
    # hydra.sweeper.params (smoke, paper_lss, paper_downstream) do not expand here: one job per preset.
    presets = {}
    for ovr in overrides.values():
        (preset,) = [o.split("=", 1)[1] for o in ovr if o.startswith("+experiment=")]
        grid = yaml.safe_load((CONF_DIR / "experiment" / f"{preset}.yaml").read_text()) or {}
        grid_keys = set(grid.get("hydra", {}).get("sweeper", {}).get("params", {}))
        assert not {o.split("=", 1)[0] for o in ovr} & grid_keys, ovr
        presets[preset] = presets.get(preset, 0) + 1
    assert presets == dict.fromkeys(PRESETS, 1)


def _sized_defs(tree: ast.AST):
    """(qualname, kind, lines) for every class and function, nested ones included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                yield qual, kind, child.end_lineno - child.lineno + 1
                yield from walk(child, f"{qual}.")
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


def test_modules_classes_and_functions_stay_small():
    """Modules <= 400 lines, classes <= 150, functions and methods <= 60 (EXCEPTIONS name the few allowed)."""
    limits = {"module": MAX_MODULE_LINES, "class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO_ROOT))
        source = path.read_text()
        sizes = [(rel, "module", len(source.splitlines()))]
        sizes += [(f"{rel}::{qual}", kind, n) for qual, kind, n in _sized_defs(ast.parse(source))]
        offenders += [f"{name} ({kind}, {n} > {limits[kind]} lines)" for name, kind, n in sizes
                      if n > limits[kind] and name not in EXCEPTIONS]
    assert not offenders, "too large:\n" + "\n".join(offenders)
