"""GPTQ through the GGUF block grids (k-quants, legacy 32-blocks, IQ4): the column sweep of `methods/gptq.py`
with the rounding of a ggml block type.

A GGUF block codec (`formats/gguf_base.py`) reconstructs every element as ``scale * levels[code] + offset``
with per-(row, sub-block) decoded values. Once a block's parameters are fitted (for a k-quant: the fp16 super
scales and the 6-bit sub-scales / mins, i.e. exactly what the file will hold), rounding one column onto that
grid is `codec.quantize_columns`, so GPTQ's error feedback runs through it unchanged:

* natural order (default): the sweep fits each block (256 columns for k-quants, 32 for the legacy types) when
  it reaches the block's first column, on the weights as already updated by the error of earlier columns
  (the reference GPTQ's group handling), importance-weighted by diag(H);
* ``act_order=True``: all blocks are fitted on the original weights first (static groups), then the columns
  are visited by decreasing diag(H).

Each column's error, divided by the pivot of the inverse Hessian's Cholesky factor, is pushed onto the columns
not yet quantized (lazy batches, as in `gptq.py`). Dead input channels are zeroed; a Hessian that is not
positive definite is retried with more damping (`gptq.inverse_hessian_factor`).
"""

from __future__ import annotations

import torch

from qtool.formats.base import QTensor


def quantize(w: torch.Tensor, codec, hessian: torch.Tensor, params) -> tuple[QTensor, object]:
    from qtool.methods.gptq import GPTQReport, inverse_hessian_factor

    W = w.float().clone()
    n_out, n = W.shape
    codec.check_shape((n_out, n))
    H = hessian.to(torch.float64, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = H.diagonal().float()
    blk = codec.block_size
    static = params.act_order is True or params.static_groups
    fitted = codec.fit(W, importance) if static else None
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if params.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp_used = inverse_hessian_factor(H, params.damp)
    del H
    batch = max(blk, -(-params.block_size // blk) * blk)
    codes = torch.empty(n_out, n, dtype=torch.uint8)
    levels = codec.levels_tensor
    u_diag = U.diagonal().tolist()
    order = perm if perm is not None else torch.arange(n)
    if static:  # per-element decoded scale/offset of every column, in visiting order
        full_scale, full_offset = codec.column_grid(fitted, slice(0, n))
        full_scale, full_offset = full_scale[:, order], full_offset[:, order]
    parts: list[dict[str, torch.Tensor]] = []
    for i1 in range(0, n, batch):
        i2 = min(i1 + batch, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for c0 in range(0, i2 - i1, blk):
            c1 = min(c0 + blk, i2 - i1)
            if static:
                sc, off = full_scale[:, i1 + c0:i1 + c1], full_offset[:, i1 + c0:i1 + c1]
            else:  # fit this block on the updated weights, weighted by its columns' importance
                p = codec.fit(W1[:, c0:c1], importance[i1 + c0:i1 + c1])
                parts.append(p)
                sc, off = codec.column_grid(p, slice(0, c1 - c0))
            for i in range(c0, c1):
                x = W1[:, i:i + 1]
                s, o = sc[:, i - c0:i - c0 + 1], off[:, i - c0:i - c0 + 1]
                q = codec.quantize_columns(x, s, o)
                err = (x - (s * levels[q.long()] + o)).div_(u_diag[i])
                W1[:, i:].sub_(err * U1[i:i + 1, i:])
                E1[:, i:i + 1] = err
                codes[:, i1 + i:i1 + i + 1] = q
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qparams = fitted if static else {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
    qt = QTensor(codec=codec, shape=(n_out, n), codes=codes, params=qparams)
    return qt, GPTQReport(damp_used=damp_used, dead_columns=int(dead.sum()), requested_damp=params.damp)
