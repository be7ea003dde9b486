"""Stage-wise calibration through one pre-norm decoder block, for true-sequential methods (GPTQ).

Inside a block, GPTQ quantizes q/k/v, then o, then gate/up, then down, and each group's Hessian must come
from inputs that the already-quantized groups produce. Re-running the block from its input for every group
costs ~2.5 block forwards; walking the block stage by stage and keeping what the next stage needs costs
about one (plus the gate/up projections once more):

    stage 0  q/k/v input  = attn_norm(x)                       (hooked, the forward stops there)
    stage 1  o input      = attention(q, k, v)                  (kept: o_in, one tensor like x)
    stage 2  gate/up input = mlp_norm(h),  h = x + o(o_in)      (h overwrites x in place; o_in is freed)
    stage 3  down input   = act(gate) * up                      (hooked, recomputed per batch, not kept)
    output   h + mlp(mlp_norm(h))                               (written into x in place)

The arithmetic is the decoder layer's own (the same modules, the same batches, the same order of
additions), so the activations equal a plain block forward bit for bit; only the work is shared. Peak
memory: the stream x plus one tensor of its size (o_in). The walk's linears and Hessians run at the calibration
`precision` (`calib/precision.py`); a full forward at the same precision gives the same activations bit
for bit. At bf16 the o projection's GEMM rounds its input to bfloat16 anyway, so the walk keeps o_in *as*
bfloat16 (half the bytes of x): the GEMM and XᵀX (its GEMM rounds to bf16 as well) see the same values, so
everything stays bit-identical to a full forward at bf16. (Keeping the down input too, 2/3 of x as bf16,
would save the gate/up recompute, ~0.7 s per block on SmolLM2 with 128 x 512 tokens, but costs 201 MB of
peak RSS on top of the stream: measured, it broke the memory target, so the walk recomputes.)
"""

from __future__ import annotations

import torch
from torch import nn

from qtool.calib.hessian import gram_upper_, rows_of, symmetric_
from qtool.calib.precision import bf16_stream, effective
from qtool.engine.blocks import malloc_trim
from qtool.io.arch import Arch


class _Stop(Exception):
    pass


class StagedBlock:
    def __init__(self, block: nn.Module, arch: Arch, runner, x: torch.Tensor, batch: int = 4,
                 precision: str = "fp32", keep_bf16: bool = True):
        """`batch` sequences go through the block at a time (4 x 512 tokens: as fast as 8 on SmolLM2 and
        ~90 MB lower peak RSS, measured). `keep_bf16=False` keeps o_in in float32 even at bf16: for blocks whose linears quantize their own
        (float32) inputs at run time (W8A8 runtime modules)."""
        self.block, self.arch, self.runner, self.x, self.batch = block, arch, runner, x, batch
        self.precision = precision
        self.stage = 0
        self.o_in: torch.Tensor | None = None
        self._bf16_keep = keep_bf16 and effective(precision) == "bf16"
        g = arch.linear_groups
        self._first = [grp[0] for grp in g]  # the linear whose input each stage collects

    # ---- helpers -------------------------------------------------------------------------------------
    def _batches(self, t: torch.Tensor):
        return range(0, t.shape[0], self.batch)

    def _captured(self, module: str, forward):
        """Run `forward()`, return the input `module` received (the forward stops there)."""
        box = []

        def hook(m, args):
            box.append(args[0])
            raise _Stop

        h = self.block.get_submodule(module).register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():
                forward()
        except _Stop:
            pass
        finally:
            h.remove()
        return box[0]

    def _inputs(self, stage: int):
        """Yield the input batches of stage `stage`'s linears (computed with the block as it is now)."""
        blk, first = self.block, self._first[stage]
        for i in self._batches(self.x):
            xb = self.x[i:i + self.batch]
            if stage in (0, 3) or (stage == 1 and self.o_in is None):
                if stage == 3:
                    norm, mlp = blk.get_submodule(self.arch.mlp_norm), blk.get_submodule(self.arch.mlp)
                    yield self._captured(first, lambda: mlp(norm(xb)))
                else:
                    yield self._captured(first, lambda: self.runner(blk, xb))
            elif stage == 1:
                yield self.o_in[i:i + self.batch]
            else:
                with torch.inference_mode():
                    yield blk.get_submodule(self.arch.mlp_norm)(xb)

    # ---- API -----------------------------------------------------------------------------------------
    def hessian(self, stage: int, name: str) -> torch.Tensor:
        """XᵀX/N (float32) of the input of linear group `stage`, as the partly quantized block produces it."""
        with bf16_stream(self.block, self.precision):
            self._goto(stage)
            h, n = None, 0
            for a in self._inputs(stage):
                a = rows_of(a, name)
                h = gram_upper_(h, a, self.precision)
                n += a.shape[0]
        malloc_trim()  # the stage's batch temporaries: not kept in RSS under the next stage's tensors
        return symmetric_(h).div_(max(n, 1))

    def output(self) -> torch.Tensor:
        """The block's output for the whole stream (every group quantized by now); reuses x's memory."""
        blk = self.block
        norm, mlp = blk.get_submodule(self.arch.mlp_norm), blk.get_submodule(self.arch.mlp)
        with bf16_stream(blk, self.precision):
            self._goto(3)
            with torch.inference_mode():
                for i in self._batches(self.x):
                    xb = self.x[i:i + self.batch]
                    xb.copy_(xb + mlp(norm(xb)))
        return self.x

    def _goto(self, stage: int) -> None:
        while self.stage < stage:
            if self.stage == 0:  # q/k/v are final: keep the attention output (o's input), filled in place
                self.o_in, o_in = None, None
                for i, a in zip(self._batches(self.x), self._inputs(1)):
                    if o_in is None:  # bf16: kept as bfloat16 (module doc)
                        o_in = torch.empty((self.x.shape[0],) + tuple(a.shape[1:]),
                                           dtype=torch.bfloat16 if self._bf16_keep else a.dtype)
                    o_in[i:i + a.shape[0]] = a
                    del a
                self.o_in = o_in
            elif self.stage == 1:  # o is final: x <- x + o(o_in), the residual stream after attention
                o = self.block.get_submodule(self.arch.linear_groups[1][0])
                with torch.inference_mode():
                    for i in self._batches(self.x):
                        xb = self.x[i:i + self.batch]
                        xb.copy_(xb + o(self.o_in[i:i + self.batch].float()))
                self.o_in = None
            self.stage += 1
