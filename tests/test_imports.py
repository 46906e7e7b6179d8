"""Imports run one way: every `lsn_exp` module imports only modules of lower layers (the README's layer table),
counting top-level, function-local and TYPE_CHECKING imports alike; the validation and report entry points load
no torch, transformers or lm-eval."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lsn_exp import REPO_ROOT

PACKAGE = REPO_ROOT / "lsn_exp"
TASKS = "tasks"  # every lm-eval task's utils.py counts as this one module
LAYER_ROW = re.compile(r"^\|\s*(\d+)\s[^|]*\|([^|]*)\|")


def layer_table(readme: Path = REPO_ROOT / "README.md") -> dict[str, int]:
    """module -> layer, read off the README's layer table (rows ``| 3 name | `models`, `settings` | ... |``)."""
    text = readme.read_text()
    section = text[text.index("### Layers"):]
    layers = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        row = LAYER_ROW.match(line)
        if row:
            for module in re.findall(r"`([\w/]+?)/?`", row.group(2)):
                layers[module] = int(row.group(1))
    return layers


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package)
    return TASKS if rel.parts[0] == TASKS else rel.stem


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """The package's modules a file imports anywhere in it (``ast.walk`` reaches function bodies and
    ``if TYPE_CHECKING:`` blocks); ``from lsn_exp import X`` names module X, or the package root for a value."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lsn_exp.")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"relative import at line {node.lineno}: write it as `from lsn_exp... import`")
        elif isinstance(node, ast.ImportFrom) and node.module == "lsn_exp":
            found |= {a.name if a.name in known else "__init__" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lsn_exp."):
            found.add(node.module.split(".")[1])
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (itself excluded)."""
    files = sorted(package.rglob("*.py"))
    known = {module_name(p, package) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = module_name(path, package)
        graph.setdefault(name, set()).update(imported_modules(ast.parse(path.read_text()), known) - {name})
    return graph


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import of a module in the same or a higher layer, as 'a (layer) imports b (layer)'."""
    return [f"{m} (layer {layers[m]}) imports {d} (layer {layers[d]})"
            for m in sorted(graph) for d in sorted(graph[m]) if layers[d] >= layers[m]]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [node, dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_every_module_has_a_layer_and_imports_only_lower_layers():
    graph, layers = import_graph(PACKAGE), layer_table()
    assert not set(graph) - set(layers), f"modules missing from the README's layer table: {set(graph) - set(layers)}"
    assert not set(layers) - set(graph), f"the layer table names modules that do not exist: {set(layers) - set(graph)}"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    bad = upward_imports(graph, layers)
    assert not bad, "imports against the layer table:\n" + "\n".join(bad)


def test_the_walk_sees_function_local_and_type_checking_imports(tmp_path):
    """The checker itself: an upward import hidden in a function or under TYPE_CHECKING is found, with its cycle."""
    package = tmp_path / "lsn_exp"
    package.mkdir()
    (package / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from lsn_exp.high import thing\n")
    (package / "high.py").write_text("def f():\n    from lsn_exp import low\n    return low\n")
    graph = import_graph(package)
    assert graph == {"low": {"high"}, "high": {"low"}}
    assert upward_imports(graph, {"low": 0, "high": 1}) == ["low (layer 0) imports high (layer 1)"]
    assert find_cycle(graph) in (["high", "low", "high"], ["low", "high", "low"])


@pytest.mark.parametrize("module", ["preflight", "settings", "report"])
def test_validation_and_report_load_neither_torch_transformers_nor_lm_eval(module):
    code = (f"import sys, lsn_exp.{module}; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'lm_eval', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    heavy = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert heavy == [], f"lsn_exp.{module} imports {sorted({m.split('.')[0] for m in heavy})}: {heavy[:10]}"


STAGE_MODULES = ("identify", "lss", "downstream", "generate", "compare", "factorsearch", "job")
PARSERS = {"identify_settings", "lss_settings", "eval_settings", "generate_settings", "compare_settings",
           "factor_search_settings", "parse_job", "plain", "with_defaults", "to_container"}


def settings_parsed_in(path: Path) -> list[str]:
    """Where a module calls a settings parser or names DictConfig: each ``line: name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            name = name if name in PARSERS else None
        elif isinstance(node, (ast.Name, ast.Attribute)) and (getattr(node, "id", None) or node.attr) == "DictConfig":
            name = "DictConfig"
        elif isinstance(node, ast.ImportFrom) and any(alias.name == "DictConfig" for alias in node.names):
            name = "DictConfig"
        if name:
            found.append(f"{path.name}:{node.lineno}: {name}")
    return sorted(found, key=lambda hit: int(hit.split(":")[1]))


def test_settings_are_parsed_once_and_stages_take_them_typed():
    """preflight.validate parses the config once into JobSettings; no stage parses a config node again."""
    found = [hit for module in STAGE_MODULES for hit in settings_parsed_in(PACKAGE / f"{module}.py")]
    allowed = [hit for hit in found if hit.startswith("job.py") and hit.endswith("DictConfig")]  # run_job's input
    assert sorted(set(found) - set(allowed)) == [] and len(allowed) <= 4


def test_the_settings_walk_sees_parser_calls(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text("from omegaconf import DictConfig\n\n\n"
                      "def f(cfg: DictConfig):\n    return settings.lss_settings(cfg)\n")
    assert settings_parsed_in(module) == ["stage.py:1: DictConfig", "stage.py:4: DictConfig",
                                          "stage.py:5: lss_settings"]
