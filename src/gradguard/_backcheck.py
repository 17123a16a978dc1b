"""Custom autograd Functions whose ``backward`` is not linear in the gradient it receives.

A backward computes a vector-Jacobian product: whatever the Function, ``backward(2·g) == 2·backward(g)``
(doubling is exact in floating point, so a linear backward passes bit for bit). One that forgets the
chain rule (``return local_derivative`` instead of ``grad_output * local_derivative``: the
"memory-efficient Swish" written by hand) hands the layers below a gradient that does not depend on
the loss; the run stays finite and does not train, and nothing else in the logs says why.

:class:`BackwardCheck` (the zero-code runner's, which sees every ``backward()`` before it runs) looks
through the first graphs for nodes of custom Functions defined outside torch, and the first time each
class's node runs, a pre-hook calls its backward twice more, on ``g`` and ``2·g`` — under ``no_grad``,
with the RNG state and stdout kept as they were, a nested ``backward()`` refused (a hand-written
checkpoint would accumulate into the parameters) — and keeps the deviation as a device tensor. Nothing
is read until :meth:`BackwardCheck.report`, at the end of the run. A deliberately non-linear backward
(a gradient clamp) is reported too; diagnose names it only in a run that did not train.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import textwrap
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from gradguard import _replay

__all__ = ["BackwardCheck"]

_SEARCHED = 3  # the first backward() calls whose graphs are searched for custom Functions
_MAX_NODES = 20_000  # nodes visited per graph
_TOLERANCE = 1e-3  # a relative deviation of backward(2g) from 2·backward(g) above this: not linear


class _Nested(Exception):
    """The Function's backward called ``backward()`` itself: the check is dropped, nothing accumulated."""


class BackwardCheck:
    """Checks each custom autograd Function's backward, once, for linearity in its incoming gradient."""

    def __init__(self) -> None:
        self._seen: set[type] = set()
        self._searched = 0
        self._deviations: list[tuple[type, list[Tensor]]] = []

    def watch(self, tensors: Any) -> None:
        """Before ``backward()`` on ``tensors``: hook the first node of each custom Function not yet seen."""
        roots = [
            getattr(t, "grad_fn", None)
            for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors])
        ]
        roots = [r for r in roots if r is not None]
        if not roots or self._searched >= _SEARCHED:
            return
        self._searched += 1
        for found in _nodes(roots):
            cls = _replay.function_class(found)
            if cls is None or cls in self._seen or cls.__module__.split(".")[0] == "torch":
                continue
            self._seen.add(cls)
            if pure(
                cls
            ):  # (a backward with side effects is never called again: the script's run comes first)
                self._hook(found, cls)

    def _hook(self, node: Any, cls: type) -> None:
        """A pre-hook on ``node`` that checks its backward the first time it runs, then removes itself."""
        handles: list[Any] = []
        handles.append(node.register_prehook(lambda grads: self._check(node, cls, grads, handles)))

    def _check(self, node: Any, cls: type, grads: tuple[Tensor | None, ...], handles: list[Any]) -> None:
        for handle in handles:
            handle.remove()
        try:
            with _quiet(grads):
                one = _outputs(node.apply(*(None if g is None else g.clone() for g in grads)))
                two = _outputs(node.apply(*(None if g is None else g * 2 for g in grads)))
                pairs = [(a, b) for a, b in zip(one, two, strict=False) if _comparable(a, b)]
                deviations = [_deviation(a, b) for a, b in pairs]
        except Exception:  # its backward cannot be called again (or called backward()): not judged
            return
        if deviations:
            self._deviations.append((cls, deviations))

    def report(self) -> list[dict[str, Any]]:
        """The Functions whose backward is not linear: ``[{"function", "source", "deviation"}]`` (one host
        read per Function checked, at the end of the run)."""
        found = []
        for cls, deviations in self._deviations:
            value = max(float(d) for d in deviations)
            if value > _TOLERANCE:
                found.append(
                    {
                        "function": _replay.function_name(cls),
                        "source": _replay.function_source(cls) or "",
                        "deviation": float(f"{value:.3g}"),
                    }
                )
        return found


#: modules whose functions a pure backward may call (tensor math, no state)
_PURE_MODULES = frozenset({"torch", "F", "nn", "math", "np", "numpy", "functional"})
#: builtins a pure backward may call
_PURE_BUILTINS = frozenset({"len", "range", "zip", "enumerate", "tuple", "list", "isinstance", "min", "max", "abs",
                            "float", "int", "bool", "any", "all", "sum", "reversed", "getattr", "hasattr"})  # fmt: skip
_IMPURE_CALLS = frozenset(
    {"backward", "grad", "print", "append", "extend", "update", "add", "insert", "pop", "write"}
)


def pure(cls: type) -> bool:
    """Whether ``cls.backward`` can be called again without changing the script's run, read from its source:
    no assignment to an attribute or an element of anything but a local variable (``ctx.cache = None`` frees
    what the real call needs; a counter, a buffer, a list), no ``global`` / ``nonlocal``, no ``print`` or
    logging, no ``autograd.grad`` / ``backward()`` (an implicit layer's adjoint solve), no in-place method or
    call on anything but a local variable or torch, no call of a function of the script's (unknown effects).
    ``False`` when the source cannot be read."""
    backward = getattr(cls, "backward", None)
    if not callable(backward):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(backward)))
    except (OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    local = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
    local |= {fn.args.vararg.arg} if fn.args.vararg else set()
    ctx = fn.args.args[0].arg if fn.args.args else "ctx"
    local |= {t.id for node in ast.walk(fn) for t in _targets(node) if isinstance(t, ast.Name)}
    local.discard(ctx)  # ctx is the real call's: its attributes are read, never written
    return all(_pure_node(node, local) for node in ast.walk(fn))


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return [
            t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])
        ]
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    if isinstance(node, (ast.For, ast.comprehension)):
        return list(node.target.elts) if isinstance(node.target, ast.Tuple) else [node.target]
    return []


def _base(node: ast.expr) -> str | None:
    """The name an attribute / subscript chain starts from (``ctx.buf[0].data`` → ``ctx``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _pure_node(node: ast.AST, local: set[str]) -> bool:
    if isinstance(node, (ast.Global, ast.Nonlocal, ast.Delete)):
        return False
    for target in _targets(node):
        if isinstance(target, (ast.Attribute, ast.Subscript)) and _base(target) not in local:
            return False
    if not isinstance(node, ast.Call):
        return True
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in _PURE_BUILTINS or func.id in local
    if isinstance(func, ast.Attribute):
        if func.attr in _IMPURE_CALLS:
            return False
        base = _base(func)
        if base in _PURE_MODULES:
            return True
        return base in local
    return False


def _nodes(roots: list[Any]) -> Iterator[Any]:
    """The graph's nodes from ``roots``, breadth first, at most :data:`_MAX_NODES`."""
    seen = {id(root) for root in roots}
    queue = list(roots)
    for node in queue:
        yield node
        for child, _ in getattr(node, "next_functions", ()):
            if child is not None and id(child) not in seen and len(queue) < _MAX_NODES:
                seen.add(id(child))
                queue.append(child)


@contextlib.contextmanager
def _quiet(grads: tuple[Tensor | None, ...]) -> Iterator[None]:
    """No grad, the RNG state and stdout/stderr as they were, ``torch.autograd.backward`` refused."""
    devices = sorted({g.device.index or 0 for g in grads if g is not None and g.is_cuda})
    backward = torch.autograd.backward

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _Nested

    torch.autograd.backward = refuse  # type: ignore[assignment]
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=devices),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            yield
    finally:
        torch.autograd.backward = backward


def _outputs(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


def _comparable(a: Any, b: Any) -> bool:
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.is_floating_point()
        and a.shape == b.shape
        and a.numel() > 0
    )


def _deviation(one: Tensor, two: Tensor) -> Tensor:
    """``max|two − 2·one| / max|2·one|`` in float32 (0 where both are zero; NaN is not judged: 0)."""
    double = one.float() * 2
    gap = (two.float() - double).abs().amax()
    scale = double.abs().amax()
    value = torch.where(scale > 0, gap / scale.clamp_min(torch.finfo(torch.float32).tiny), gap)
    return torch.nan_to_num(value, nan=0.0, posinf=0.0)
