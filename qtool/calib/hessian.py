"""Statistics collectors: the input Hessian XᵀX/N of linears, gathered with forward pre-hooks."""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the last hook of a group: the rest of the block's forward is not needed."""


class HessianCollector:
    """Accumulates H = XᵀX / N (float32) over the inputs of `names` in `block`; stops the forward early."""

    def __init__(self, block: nn.Module, names: list[str]):
        self.h = {n: None for n in names}
        self.count = {n: 0 for n in names}
        self._seen: set[str] = set()
        self._last_input = self._last_h = None
        self._hooks = [block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args):
            rows = args[0].numel() // args[0].shape[-1]
            if args[0] is self._last_input:  # q/k/v (and gate/up) share one input: one XᵀX for all
                h = self._last_h.clone()
            else:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if not torch.isfinite(x).all():
                    raise ValueError(f"NaN/Inf in the calibration activations entering {name}")
                h = x.T @ x
                self._last_input, self._last_h = args[0], h
            self.h[name] = h if self.h[name] is None else self.h[name].add_(h)
            self.count[name] += rows
            self._seen.add(name)
            if len(self._seen) == len(self.h):
                self._seen.clear()
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
            self._last_input = self._last_h = None
        return {n: h / max(self.count[n], 1) for n, h in self.h.items()}
