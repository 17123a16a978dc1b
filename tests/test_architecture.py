"""The house stays as drawn: which module of gradguard may import which (docs/architecture.md).

The imports are read from the source with :mod:`ast` (nothing is imported). :data:`RULES` is the
one table of the dependency rules: each module of ``src/gradguard`` belongs to one group, and a
group may import only the groups and third-party packages its row names — at module level (what
loads with the module), or also inside a function (what loads when that function runs). The
standard library is always allowed. Imports under ``if TYPE_CHECKING:`` load nothing, so the rows
do not limit them; they still count as ties between modules: no cycle may run through them either.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gradguard"


class Rule(NamedTuple):
    modules: tuple[str, ...]  # dotted names; a glob (``*``) matches a module no exact name claims
    imports: tuple[str, ...]  # groups and PACKAGES it may import at module level
    lazily: tuple[str, ...] = ()  # ... and also inside a function only


# Third-party packages by the name the rules use; an import belongs to its longest matching prefix.
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "frameworks": (
        "lightning",
        "pytorch_lightning",
        "transformers",
        "accelerate",
        "wandb",
        "tensorboard",
        "torch.utils.tensorboard",
    ),
    "numpy/sklearn": ("numpy", "sklearn"),
    "plotly/rich": ("plotly", "rich"),
    "triton": ("triton",),
}

TORCH_FREE = ("base", "contracts", "readers")

# THE DEPENDENCY RULES (docs/architecture.md shows the same table).
RULES: dict[str, Rule] = {
    # no gradguard import at all
    "base": Rule(("gradguard._version", "gradguard.errors", "gradguard.safetext"), ()),
    # the torch-free contracts: the run log, the step record, the events, the run table, the op table
    "contracts": Rule(
        (
            "gradguard.runlog",
            "gradguard.runlog.*",  # its parts: _format, _encoding, _files, _writer, _reader
            "gradguard.record",
            "gradguard.events",
            "gradguard.runtable",
            "gradguard.optable",
            "gradguard.tunelog",
        ),
        ("base", "contracts"),
    ),
    # the torch-free readers of a run directory
    "readers": Rule(
        ("gradguard.diagnose", "gradguard.diagnose.*", "gradguard.report"),
        ("base", "contracts", "readers"),
        lazily=("plotly/rich",),
    ),
    # the package: the public names load their (torch) modules on first access, with no import statement
    "api": Rule(("gradguard",), ("base",)),
    # the command line: torch-free until `run` or `demo` imports what trains
    "cli": Rule(
        ("gradguard.cli", "gradguard.__main__"),
        ("base", "contracts", "readers", "cli"),
        lazily=("integrations", "demos"),
    ),
    # the core that touches tensors: never a reader, the command line, an integration, a demo or a framework
    "core": Rule(
        (
            "gradguard.stats",
            "gradguard.clip",
            "gradguard.clip.*",
            "gradguard.monitor",
            "gradguard.locate",
            "gradguard._replay",  # what a replay needs beyond the inputs: autocast, custom Functions, wrappers
            "gradguard._inputs",  # what enters a step besides the batch: targets, labels, carried state
            "gradguard._backcheck",  # custom autograd Functions whose backward is not linear in its gradient
            "gradguard.guard",
            "gradguard.guard.*",
            "gradguard._guard",  # the guard's parts
            "gradguard._guard.*",
            "gradguard._distributed",
            "gradguard.tune",
            "gradguard._kernels",  # the Triton norm/clip kernels (CUDA; triton loaded on first use)
            "gradguard._rule_kernel",  # ZClip's / auto's rule in one Triton launch (CUDA; triton on first use)
            "gradguard._step_kernel",  # a step's measurement math in one Triton launch (CUDA; triton on first use)
            "gradguard._triton",  # triton imported on first use, a launch's device
        ),
        ("base", "contracts", "core", "torch"),
        lazily=("triton",),
    ),
    # thin adapters to the frameworks
    "integrations": Rule(
        ("gradguard.integrations", "gradguard.integrations.*"),
        ("base", "contracts", "readers", "api", "core", "integrations", "torch", "frameworks"),
    ),
    # the embedded scenarios of `gradguard demo`
    "demos": Rule(
        ("gradguard.demos", "gradguard.demos.*"),
        ("base", "contracts", "readers", "api", "core", "demos", "torch", "numpy/sklearn"),
    ),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # a gradguard module, or the dotted name of another import
    line: int
    lazy: bool  # inside a function
    types: bool = False  # under ``if TYPE_CHECKING:`` (loads nothing)


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_names()


def group_of(module: str) -> str:
    """The row of RULES that holds ``module``: an exact name first, else the one glob that matches."""
    exact = [g for g, rule in RULES.items() if module in rule.modules]
    if exact:
        return exact[0]
    globbed = [g for g, rule in RULES.items() if any(fnmatch.fnmatchcase(module, m) for m in rule.modules)]
    assert len(globbed) == 1, (
        f"{module} belongs to {len(globbed)} groups of RULES ({globbed}); "
        "add it to exactly one row of RULES in tests/test_architecture.py and of docs/architecture.md"
    )
    return globbed[0]


def package_of(name: str) -> str | None:
    """The PACKAGES name that ``name`` belongs to (longest prefix), or None."""
    best, length = None, -1
    for key, prefixes in PACKAGES.items():
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > length:
                best, length = key, len(p)
    return best


def _resolve(name: str) -> str:
    """The gradguard module an import of ``name`` loads (its longest known prefix)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names one import statement loads (gradguard names resolved to their module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [_resolve(n) if n.partition(".")[0] == PACKAGE else n for n in names]


def imports_of(module: str, source: str | None = None) -> list[Import]:
    """Every runtime import of ``module`` (of ``source`` if given) outside the standard library.

    Those under ``if TYPE_CHECKING:`` come with ``types=True``.
    """
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool, types: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.extend(Import(module, t, node.lineno, lazy, types) for t in _targets(module, node))
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.body:
                visit(stmt, lazy, True)
            for stmt in node.orelse:
                visit(stmt, lazy, types)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, types)

    if source is None:
        source = MODULES[module].read_text(encoding="utf-8")
    visit(ast.parse(source), lazy=False, types=False)
    return [i for i in out if i.target != "__future__" and i.target.partition(".")[0] not in _STDLIB]


_STDLIB = set(sys.stdlib_module_names) - {PACKAGE}
IMPORTS = [i for m in MODULES for i in imports_of(m)]


def kind_of(imp: Import) -> str:
    """The group or PACKAGES name of what ``imp`` imports."""
    if imp.target.partition(".")[0] == PACKAGE:
        return group_of(imp.target)
    package = package_of(imp.target)
    assert package is not None, (
        f"{imp.module} (line {imp.line}) imports {imp.target}, which no row of PACKAGES names; "
        "add it to PACKAGES in tests/test_architecture.py and allow it in the rows that need it"
    )
    return package


def test_the_rules_name_only_groups_and_packages() -> None:
    for group, rule in RULES.items():
        unknown = set(rule.imports + rule.lazily) - set(RULES) - set(PACKAGES)
        assert not unknown, f"RULES[{group!r}] names {sorted(unknown)}, neither a group nor a package"


def test_every_module_belongs_to_one_group() -> None:
    for module in MODULES:
        group_of(module)  # asserts


def violations(imports: list[Import]) -> list[str]:
    """One line per import that the row of its module does not allow: where, what, and what is allowed."""
    broken = []
    for imp in imports:
        if imp.types:
            continue
        group, kind = group_of(imp.module), kind_of(imp)
        rule = RULES[group]
        if kind in rule.imports or (imp.lazy and kind in rule.lazily):
            continue
        where = "inside a function" if imp.lazy else "at module level"
        allowed = f"; {group} may import {', '.join(rule.imports) or 'no other group'}"
        if rule.lazily:
            allowed += f", and inside a function {', '.join(rule.lazily)}"
        broken.append(
            f"{imp.module} ({group}), line {imp.line}: imports {imp.target} ({kind}) {where}{allowed}"
        )
    return broken


def test_every_import_is_allowed_by_its_row() -> None:
    broken = violations(IMPORTS)
    assert not broken, "imports the rules forbid (RULES in tests/test_architecture.py):\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("gradguard.runlog", "import torch"),
        ("gradguard.diagnose", "def f():\n    from torch import nn"),
        ("gradguard.report", "from gradguard.guard import Guard"),
        ("gradguard.cli", "from gradguard.integrations import zerocode"),  # only inside `run`
        ("gradguard.guard", "from gradguard.report import write_report"),
        ("gradguard.clip", "def f():\n    import gradguard.cli"),
        ("gradguard.monitor", "from torch.utils.tensorboard import SummaryWriter"),
        ("gradguard.guard", "import lightning.pytorch as pl"),
        ("gradguard.stats", "import gradguard"),
    ],
)
def test_a_forbidden_import_is_caught(module: str, source: str) -> None:
    assert len(violations(imports_of(module, source))) == 1


@pytest.mark.parametrize("group", TORCH_FREE)
def test_torch_free_groups_never_import_torch_or_the_core(group: str) -> None:
    """The rule itself, spelled out: what the rows above say for the modules that must run without torch."""
    rule = RULES[group]
    assert not {"torch", "frameworks", "core", "api", "integrations", "demos", "cli"} & set(
        rule.imports + rule.lazily
    )
    assert set(rule.imports) <= set(TORCH_FREE)


def test_the_core_never_imports_readers_the_cli_integrations_demos_or_frameworks() -> None:
    rule = RULES["core"]
    assert not {"readers", "cli", "api", "integrations", "demos", "frameworks"} & set(
        rule.imports + rule.lazily
    )


def test_no_import_cycles() -> None:
    """No cycle among gradguard's modules, counting imports inside functions and for types too."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    cycle = _find_cycle(graph)
    assert cycle is None, "an import cycle: " + " → ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


SAMPLE = """
import os, torch.nn
from typing import TYPE_CHECKING
from gradguard import runlog, errors as e
from gradguard.runlog import RunLog
from . import stats
from .diagnose import diagnose
if TYPE_CHECKING:
    from gradguard.guard import Guard
else:
    import numpy
class A:
    import plotly
def f():
    import gradguard.integrations.zerocode
    from gradguard.demos import rnn
"""


def test_the_checker_sees_what_it_should() -> None:
    """The parser itself: lazy imports, TYPE_CHECKING blocks, submodules in ``from … import``."""
    found = {(i.target, i.lazy, i.types) for i in imports_of("gradguard.report", SAMPLE)}
    assert found == {
        ("torch.nn", False, False),
        ("gradguard.runlog", False, False),
        ("gradguard.errors", False, False),
        ("gradguard.stats", False, False),
        ("gradguard.diagnose", False, False),
        ("gradguard.guard", False, True),
        ("numpy", False, False),
        ("plotly", False, False),  # a class body runs at import
        ("gradguard.integrations.zerocode", True, False),
        ("gradguard.demos.rnn", True, False),
    }
    assert group_of("gradguard._version") == "base" and group_of("gradguard._distributed") == "core"
    assert package_of("torch.utils.tensorboard") == "frameworks" and package_of("torch.nn") == "torch"
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
