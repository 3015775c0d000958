"""The cost model of a conv_einsum contraction: exact MACs and elements written per pairwise
step.

An intermediate result is named by the set of operands it combines (a bit mask). Its modes
are those still needed: in the output or held by an operand outside the set. A convolved
mode has the signal length ``n`` while only its signal operand is in the set, the kernel
length ``k`` while only its kernel operand is, and the output length once both are.

A pairwise step multiplies, for every mode of its two operands, one factor: the mode's
length, except for a mode convolved *in this step*, which costs output length x kernel
length (each output element reads ``k`` taps). conv_einsum's published code charges
max(n, k)^2 there instead: for a 3x3 convolution on 56x56 that is 56^2 / (56 * 3) = 19x too
much per spatial mode. Summing a mode that only one operand holds and the output does not is
done before any step and costs no MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..ops.sizes import conv_length
from .parse import ConvParams, Expression, conv_sizes, mode_sizes

__all__ = ["Problem", "StepCost", "OBJECTIVES", "COMBO_FACTOR"]

OBJECTIVES = ("flops", "memory", "combo")
COMBO_FACTOR = 64  # 'combo' = MACs + COMBO_FACTOR x elements written (as opt_einsum's combo)
MAX_CONV_DIMS = 3  # torch has conv1d/2d/3d: at most three modes convolved in one step


@dataclass(frozen=True)
class StepCost:
    """One pairwise step: ``macs``, ``written`` (elements of its result), the modes
    ``convolved`` in it, and whether torch can run it (``feasible``)."""

    macs: int
    written: int
    convolved: tuple[str, ...]
    feasible: bool = True

    def objective(self, name: str) -> float:
        if not self.feasible:
            return math.inf
        if name == "flops":
            return self.macs
        if name == "memory":
            return self.written
        return self.macs + COMBO_FACTOR * self.written


class Problem:
    """An expression with concrete shapes and convolution parameters: modes and lengths of
    every intermediate (by operand bit mask) and the cost of every pairwise step."""

    def __init__(self, expr: Expression, shapes: Sequence[Sequence[int]], params: ConvParams):
        self.expr = expr
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        self.sizes = mode_sizes(expr, self.shapes)
        self.params = params
        self.conv: dict[str, tuple[int, int, int]] = {}
        for m, (n, k) in conv_sizes(expr, self.shapes).items():
            stride, pad, dil = params.of(m)
            out = conv_length(n, k, stride, pad, dil)
            if out < 1:
                raise _too_short(expr, m, n, k, stride, pad, dil)
            self.conv[m] = (n, k, out)
        self.signal = expr.signal
        self.kernel = expr.kernel
        self.n = len(expr.inputs)
        self.full = (1 << self.n) - 1
        self._owners = {m: sum(1 << i for i, ops in enumerate(expr.inputs) if m in ops)
                        for m in set("".join(expr.inputs))}
        self._modes: dict[int, dict[str, int]] = {}

    def modes(self, mask: int) -> dict[str, int]:
        """Modes (in first-appearance order) and lengths of the intermediate ``mask``."""
        hit = self._modes.get(mask)
        if hit is not None:
            return hit
        out: dict[str, int] = {}
        for i, ops in enumerate(self.expr.inputs):
            if not mask >> i & 1:
                continue
            for m in ops:
                if m in out:
                    continue
                if m not in self.expr.output and not self._owners[m] & ~mask:
                    continue  # summed: nobody outside needs it
                out[m] = self.length(m, mask)
        if mask == self.full:  # the output, in output order
            out = {m: out[m] for m in self.expr.output}
        self._modes[mask] = out
        return out

    def length(self, m: str, mask: int) -> int:
        if m not in self.conv:
            return self.sizes[m]
        n, k, out = self.conv[m]
        has_sig, has_ker = mask >> self.signal[m] & 1, mask >> self.kernel[m] & 1
        return out if has_sig and has_ker else (n if has_sig else k)

    def step(self, a: int, b: int) -> StepCost:
        """Cost of combining intermediates ``a`` and ``b`` (disjoint masks)."""
        ma, mb = self.modes(a), self.modes(b)
        convolved = tuple(m for m in ma if m in mb and m in self.conv)
        macs = 1
        for m, n in ma.items():
            macs *= self.conv[m][2] * self.conv[m][1] if m in convolved else n
        for m, n in mb.items():
            if m not in ma:
                macs *= n
        written = math.prod(self.modes(a | b).values())
        feasible = True
        if convolved:
            sides = {bool(a >> self.signal[m] & 1) for m in convolved}
            feasible = len(sides) == 1 and len(convolved) <= MAX_CONV_DIMS
        return StepCost(macs, written, convolved, feasible)

    def shape(self, mask: int) -> tuple[int, ...]:
        return tuple(self.modes(mask).values())


def _too_short(expr, m, n, k, stride, pad, dil):
    from ..errors import ConvgapError
    return ConvgapError(f"einsum expression {expr.text!r}: convolved mode {m!r} has signal "
                        f"length {n} and kernel length {k} (dilation {dil}, padding {pad}, "
                        f"stride {stride}): the output would be empty")
