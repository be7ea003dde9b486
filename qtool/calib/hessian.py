"""Statistics collectors: the input Hessian XᵀX/N and mean |x| of linears, gathered with forward pre-hooks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qtool.calib.precision import matmul_precision


class _Stop(Exception):
    """Raised by the last hook of a group: the rest of the block's forward is not needed."""


def rows_of(x: torch.Tensor, name: str) -> torch.Tensor:
    """Activations entering linear `name` as float32 rows (tokens, features); NaN/Inf is an error naming it."""
    x = x.reshape(-1, x.shape[-1]).float()
    # a sum of finite values is finite or overflows to ±inf, and any NaN/Inf makes it non-finite: the full
    # (4x slower) element check runs only when the cheap one fails
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise ValueError(f"NaN/Inf in the calibration activations entering {name}")
    return x


def gram_upper_(h: torch.Tensor | None, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
    """Accumulate the upper block triangle of XᵀX into `h` (allocated when None); finish with `symmetric_`.
    `precision`: of the GEMMs (`calib/precision.py`); None keeps the caller's setting.

    XᵀX is symmetric, so only row panels against the columns from the panel's start on are multiplied:
    with k panels (k+1)/2k of the full product's work (k = 4: 5/8), still as a few large
    GEMMs written in place into `h` (a row slice is a valid BLAS output). The diagonal blocks are computed
    whole; everything below them is filled by `symmetric_`.
    """
    n = x.shape[1]
    knob = matmul_precision(precision) if precision else contextlib.nullcontext()
    with torch.inference_mode(False), knob:  # callers may run inside inference mode: h must stay a normal tensor
        if h is None:
            h = torch.zeros(n, n, dtype=x.dtype)
        for a0, a1 in _panels(n):
            h[a0:a1, a0:].addmm_(x[:, a0:a1].T, x[:, a0:])
    return h


def symmetric_(h: torch.Tensor) -> torch.Tensor:
    """Fill the part of `h` below the diagonal blocks of `gram_upper_` from the part above it (exactly)."""
    n = h.shape[0]
    for a0, a1 in _panels(n):
        h[a1:, a0:a1] = h[a0:a1, a1:].T
    return h


def _panels(n: int) -> list[tuple[int, int]]:
    k = 1 if n < 256 else 4 if n < 2048 else 8  # measured: 4 panels take 0.65-0.7x the full product's time
    c = -(-n // k)
    return [(a, min(a + c, n)) for a in range(0, n, c)]


class HessianCollector:
    """Accumulates H = XᵀX / N (float32) and mean |x| over the inputs of `names` in `block`; stops the
    forward early once every hooked linear has seen its input. After `run`, `abs_mean[name]` holds mean |x|
    and `absmax[name]` max |x|. With `hessian=False` XᵀX is skipped (`run` then maps every name to None).
    `precision` is that of the XᵀX GEMMs (`calib/precision.py`); the forward's own is the caller's."""

    def __init__(self, block: nn.Module, names: list[str], early_stop: bool = True, hessian: bool = True,
                 precision: str = "fp32"):
        self.early_stop = early_stop
        self.precision = precision
        self.hessian = hessian
        self.h = {n: None for n in names}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.abs_mean: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.count = {n: 0 for n in names}
        self._seen: set[str] = set()
        self._last_input = self._last_h = self._last_abs = None
        self._hooks = [block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args):
            rows = args[0].numel() // args[0].shape[-1]
            if args[0] is self._last_input:  # q/k/v (and gate/up) share one input: one XᵀX for all
                h, (a, m) = (self._last_h.clone() if self.hessian else None), self._last_abs
            else:
                x = rows_of(args[0], name)
                xa = x.abs()
                h = gram_upper_(None, x, self.precision) if self.hessian else None
                a, m = xa.sum(0), xa.amax(0)
                self._last_input, self._last_h, self._last_abs = args[0], h, (a, m)
            if self.hessian:
                self.h[name] = h if self.h[name] is None else self.h[name].add_(h)
            self.abs_sum[name] = a.clone() if name not in self.abs_sum else self.abs_sum[name].add_(a)
            self.absmax[name] = m.clone() if name not in self.absmax else torch.maximum(self.absmax[name], m)
            self.count[name] += rows
            self._seen.add(name)
            if len(self._seen) == len(self.h):
                self._seen.clear()
                if self.early_stop:
                    raise _Stop

        return hook

    def run(self, forward, batches) -> dict[str, torch.Tensor]:
        """Run `forward(batch)` on each batch (stopping early), remove the hooks, return {name: H}."""
        try:
            for b in batches:
                try:
                    forward(b)
                except _Stop:
                    pass
        finally:
            for hk in self._hooks:
                hk.remove()
            self._last_input = self._last_h = self._last_abs = None
        self.abs_mean = {n: a / max(self.count[n], 1) for n, a in self.abs_sum.items()}
        return {n: None if h is None else symmetric_(h).div_(max(self.count[n], 1)) for n, h in self.h.items()}
