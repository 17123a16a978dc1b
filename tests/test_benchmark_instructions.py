"""``benchmarks/instructions.py`` (the guard's fixed cost in instructions, under callgrind): each
part runs exactly once under its own C function, and the report is read back part by part. The
counted run itself needs Valgrind and minutes; these checks need neither."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "instructions_benchmark", ROOT / "benchmarks" / "instructions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_part_runs_once_under_a_c_function_of_its_own(bench: ModuleType) -> None:
    functions = list(bench.PARTS.values())
    assert len(set(functions)) == len(functions)
    for fn in functions:
        calls: list[int] = []
        bench._under(fn, functools.partial(calls.append, 1))
        assert calls == [1], fn


def test_the_report_is_read_part_by_part_per_step(bench: ModuleType) -> None:
    lines = [
        f"  {1000 * (i + 1):,} ( 0.{i}%)  /build/Python-3.11.7/./Modules/x.c:{fn} [/lib/libpython3.11.so.1.0]"
        for i, fn in enumerate(bench.PARTS.values())
    ]
    # (a line callgrind_annotate also prints for the same function, from a header: not the part's)
    text = "\n".join(["        208 ( 0.00%)  ./Include/object.h:dropwhile_next", *lines])
    found = bench.parse(text, steps=10)
    assert found == {name: 100.0 * (i + 1) for i, name in enumerate(bench.PARTS)}
    with pytest.raises(SystemExit, match="did not report"):
        bench.parse("\n".join(lines[1:]), steps=10)


@pytest.mark.parametrize("log", [False, True], ids=["no-log", "run-log"])
def test_the_counted_process_runs_the_parts_of_a_step(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, log: bool
) -> None:
    ran: list[str] = []
    under = bench._under
    monkeypatch.setattr(bench, "_under", lambda fn, call: (ran.append(fn), under(fn, call)))
    monkeypatch.setattr(sys, "path", list(sys.path))
    bench.child("mlp2x32", "norm:1", 2, log)
    assert ran == list(bench.PARTS.values()) * 2
