"""Contraction order search for conv_einsum expressions.

A *plan* is a list of merges ``(a, b)`` of operand bit masks, in execution order; a *path*
is the same in opt_einsum's format: pairs of positions in the current operand list, the two
operands removed and their result appended at the end.

``optimal``: dynamic programming over all subsets of operands (every binary contraction
tree, outer products included), with branch-and-bound pruning; exact, O(3^n) steps, used up
to :data:`OPTIMAL_MAX` operands. ``greedy``: repeatedly the cheapest pairwise step, pairs
sharing a mode first; used beyond. ``left``: ((A B) C) D ..., the order the expression is
written in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from rich.table import Table

from ..errors import ConvgapError
from .cost import OBJECTIVES, Problem, StepCost

__all__ = ["PathInfo", "Step", "search", "plan_to_path", "path_to_plan", "left_plan",
           "OPTIMAL_MAX"]

OPTIMAL_MAX = 8

Plan = list[tuple[int, int]]


@dataclass(frozen=True)
class Step:
    """One pairwise step: operand modes, result modes, its cost and how it runs."""

    left: str
    right: str
    result: str
    shape: tuple[int, ...]
    macs: int
    written: int
    convolved: tuple[str, ...]

    @property
    def kind(self) -> str:
        return f"conv{len(self.convolved)}d" if self.convolved else "contract"


@dataclass
class PathInfo:
    """What :func:`convgap.einsum_path` returns (as opt_einsum's ``PathInfo``): the path
    (opt_einsum format), the per-step table and totals. ``macs``: multiply-accumulates of the
    chosen order; ``naive_macs``: of left-to-right order; ``written``: elements written by
    all steps; ``largest``: elements of the largest intermediate."""

    expression: str
    shapes: list[tuple[int, ...]]
    objective: str
    method: str
    path: list[tuple[int, int]]
    steps: list[Step]
    macs: int
    written: int
    largest: int
    naive_macs: int
    plan: Plan = field(repr=False, default_factory=list)

    @property
    def speedup(self) -> float:
        """Left-to-right MACs / chosen MACs."""
        return self.naive_macs / self.macs if self.macs else 1.0

    def table(self) -> Table:
        t = Table(title=f"{self.expression}  ({self.method}, objective={self.objective})",
                  title_justify="left")
        for col in ("step", "operands", "result", "kind", "MACs", "elements"):
            t.add_column(col, justify="right" if col in ("MACs", "elements") else "left")
        for i, s in enumerate(self.steps):
            t.add_row(str(self.path[i]), f"{s.left},{s.right}",
                      f"{s.result} {list(s.shape)}", s.kind, f"{s.macs:,}", f"{s.written:,}")
        return t

    def __str__(self) -> str:
        lines = [f"  expression: {self.expression}",
                 f"  shapes: {', '.join(str(list(s)) for s in self.shapes)}",
                 f"  path ({self.method}, objective={self.objective}): {self.path}",
                 f"  MACs: {self.macs:,} (left-to-right {self.naive_macs:,}, "
                 f"{self.speedup:.3g}x)",
                 f"  elements written: {self.written:,}, largest intermediate: "
                 f"{self.largest:,}",
                 f"  {'step':>8}  {'operands':<24}{'result':<18}{'kind':<10}{'MACs':>16}"]
        for p, s in zip(self.path, self.steps):
            lines.append(f"  {str(p):>8}  {s.left + ',' + s.right:<24}{s.result:<18}"
                         f"{s.kind:<10}{s.macs:>16,}")
        return "\n".join(lines)


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _optimal(p: Problem, objective: str) -> Plan:
    best: dict[int, tuple[float, tuple[int, int] | None]] = {1 << i: (0.0, None)
                                                            for i in range(p.n)}
    by_size: list[list[int]] = [[] for _ in range(p.n + 1)]
    for mask in range(1, p.full + 1):
        by_size[bin(mask).count("1")].append(mask)
    for size in range(2, p.n + 1):
        for s in by_size[size]:
            low = s & -s
            rest = s ^ low
            top, arg = math.inf, None
            sub = rest
            while True:  # every split: a holds the lowest operand, b is nonempty
                a = low | sub
                b = s ^ a
                if b:
                    ca, cb = best[a][0], best[b][0]
                    if ca + cb < top:  # bound: skip steps that cannot win
                        c = ca + cb + p.step(a, b).objective(objective)
                        if c < top:
                            top, arg = c, (a, b)
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            best[s] = (top, arg)
    if best[p.full][1] is None and p.n > 1:
        raise _infeasible(p)
    plan: Plan = []

    def emit(mask: int) -> None:
        arg = best[mask][1]
        if arg is None:
            return
        emit(arg[0])
        emit(arg[1])
        plan.append(arg)
    emit(p.full)
    if math.isinf(best[p.full][0]):
        raise _infeasible(p)
    return plan


def _greedy(p: Problem, objective: str) -> Plan:
    live = [1 << i for i in range(p.n)]
    plan: Plan = []
    while len(live) > 1:
        choice, top = None, (True, math.inf)
        for i in range(len(live)):
            for j in range(i + 1, len(live)):
                a, b = live[i], live[j]
                shared = bool(set(p.modes(a)) & set(p.modes(b)))
                c = p.step(a, b).objective(objective)
                key = (not shared, c)
                if key < top:
                    top, choice = key, (i, j)
        if choice is None or math.isinf(top[1]):
            raise _infeasible(p)
        i, j = choice
        a, b = live[i], live[j]
        plan.append((a, b))
        live = [m for k, m in enumerate(live) if k not in (i, j)] + [a | b]
    return plan


def left_plan(n: int) -> Plan:
    """((A B) C) D ...: the order the expression is written in."""
    plan: Plan = []
    acc = 1
    for i in range(1, n):
        plan.append((acc, 1 << i))
        acc |= 1 << i
    return plan


def _infeasible(p: Problem) -> ConvgapError:
    return ConvgapError(
        f"einsum expression {p.expr.text!r}: no contraction order can run it: every order "
        "has a step convolving more than three modes at once, or convolving one mode with "
        "the signal on one side and another with the signal on the other side")


def search(p: Problem, objective: str = "flops", method: str = "auto") -> tuple[Plan, str]:
    """The plan for ``p`` minimising ``objective`` by ``method`` ('auto', 'optimal',
    'greedy', 'left'); returns (plan, method used)."""
    if objective not in OBJECTIVES:
        raise ConvgapError(f"objective must be one of {', '.join(OBJECTIVES)}; got "
                           f"{objective!r}")
    if method == "auto":
        method = "optimal" if p.n <= OPTIMAL_MAX else "greedy"
    if method == "optimal":
        return (_optimal(p, objective) if p.n > 1 else []), method
    if method == "greedy":
        try:
            return _greedy(p, objective), method
        except ConvgapError:  # greedy can paint itself into a corner (mixed signal sides)
            for a, b in left_plan(p.n):  # left to right keeps every signal on the left
                if not p.step(a, b).feasible:
                    raise
            return left_plan(p.n), "left (greedy found no runnable order)"
    if method == "left":
        plan = left_plan(p.n)
        for a, b in plan:
            if not p.step(a, b).feasible:
                raise ConvgapError(f"einsum expression {p.expr.text!r}: left-to-right order "
                                   f"cannot run it (step {p.modes(a)} x {p.modes(b)})")
        return plan, method
    raise ConvgapError(f"path method must be 'auto', 'optimal', 'greedy' or 'left'; got "
                       f"{method!r}")


def plan_to_path(plan: Plan, n: int) -> list[tuple[int, int]]:
    live = [1 << i for i in range(n)]
    path = []
    for a, b in plan:
        i, j = sorted((live.index(a), live.index(b)))
        path.append((i, j))
        live = [m for k, m in enumerate(live) if k not in (i, j)] + [a | b]
    return path


def path_to_plan(path: Sequence[Sequence[int]], p: Problem) -> Plan:
    """Check an opt_einsum-format path and turn it into a plan."""
    live = [1 << i for i in range(p.n)]
    plan: Plan = []
    try:
        pairs = [tuple(int(v) for v in pair) for pair in path]
    except (TypeError, ValueError):
        raise ConvgapError(f"a path is a list of (i, j) pairs; got {path!r}") from None
    for step, pair in enumerate(pairs):
        if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= v < len(live) for v in pair):
            raise ConvgapError(f"path step {step} {pair}: needs two different positions "
                               f"among the {len(live)} current operands")
        i, j = sorted(pair)
        a, b = live[i], live[j]
        if not p.step(a, b).feasible:
            raise ConvgapError(f"path step {step} {pair}: torch cannot run this step (it "
                               "convolves more than three modes, or mixes signal sides)")
        plan.append((a, b))
        live = [m for k, m in enumerate(live) if k not in (i, j)] + [a | b]
    if len(live) != 1:
        raise ConvgapError(f"the path has {len(pairs)} steps; {p.n} operands need "
                           f"{p.n - 1}")
    return plan


def info(p: Problem, plan: Plan, objective: str, method: str) -> PathInfo:
    steps = []
    for a, b in plan:
        c: StepCost = p.step(a, b)
        steps.append(Step("".join(p.modes(a)), "".join(p.modes(b)), "".join(p.modes(a | b)),
                          p.shape(a | b), c.macs, c.written, c.convolved))
    naive = 0
    try:
        naive = sum(p.step(a, b).macs for a, b in left_plan(p.n))
    except Exception:  # pragma: no cover - left order always has a cost
        naive = 0
    return PathInfo(p.expr.text, p.shapes, objective, method, plan_to_path(plan, p.n), steps,
                    sum(s.macs for s in steps), sum(s.written for s in steps),
                    max((s.written for s in steps), default=0), naive, plan)
