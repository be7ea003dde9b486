"""Measured costs (`qtool sensitivity --mode measured`): per-tensor costs in units of the final-logit KL divergence.

The proxy prices a tensor by its own output error; tensors in different places of the network matter very
differently for the model's output. Measured mode weighs each tensor's effect by its block's downstream
sensitivity, measured once per block, on a small token budget of the calibration text:

1. One pass over the blocks with the float model. For block j and each tensor t of it, each candidate c:
   quantize t alone with c (through the plan's method), run the block on its float input, and record
   e(t, c) = mean ‖Δ block output‖² per token (the error as it leaves the block, after its nonlinearities).
2. The block's downstream sensitivity s_j: a probe perturbs block j's output by a realistic error (the block
   with all its linears at a reference candidate: δ_j), is carried through the remaining float blocks, and
   s_j = KL(final logits) / mean ‖δ_j‖². The probes of all blocks travel together, so every block is
   materialized once (memory: one block + a hidden state per probe, not the model).
3. cost(t, c) = s_j · e(t, c): KL's second-order term with the block's sensitivity measured at its own error
   scale. The token embeddings and the output head are measured directly: the KL with that tensor alone
   quantized (a tied embedding: as the input and the head together).

Costs of tensors add up to a predicted KL of the mix (first order in the independent errors); the benchmark
reports how well they rank single-tensor changes and whole mixes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qtool.plan import EMBED, HEAD
from qtool.sensitivity.costs import Option, options_for, quantize_as


def measure(source, stats, candidates: list[str], ids: torch.Tensor, *, method: str = "rtn", fmt=None,
            scale_dtype: torch.dtype = torch.float32, reference: str | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> tuple[dict[str, list[Option]], dict]:
    """({module: options with KL-unit costs}, details: per-block sensitivities and probe sizes).

    `ids` (n_seq, seq_len): the token budget; `stats`: the calibration statistics (GPTQ's Hessians, the GGUF
    codecs' importance); `reference`: the candidate the probes use (default: the middle one by size)."""
    from qtool.engine.blocks import BlockRunner, materialize, release, skeleton
    from qtool.engine.check import logit_kld
    from qtool.formats.registry import codec
    from qtool.io.arch import arch_of
    from qtool.outputs import output_format

    fmt = fmt or output_format("gguf")
    progress = progress or (lambda stage, done, total: None)
    cfg = source.config
    arch = arch_of(cfg)
    n = cfg.num_hidden_layers
    skel = skeleton(cfg)
    runner = BlockRunner(skel, cfg, ids.shape[1])
    embed = source.get(arch.embed).float()
    x = embed[ids]
    errors: dict[str, dict[str, float]] = {}
    probes: dict[int, torch.Tensor] = {}  # block -> its perturbed stream, carried forward
    probe_size: dict[int, float] = {}

    def run(block, h):
        return torch.cat([runner(block, b) for b in h.split(4)])

    for j in range(n):
        prefix = arch.block_prefix(j)
        block = materialize(skel.get_submodule(prefix.rstrip(".")), prefix, source)
        for i in probes:
            probes[i] = run(block, probes[i])
        y = run(block, x)
        ref_w = {}
        for lin in arch.linears:
            name = prefix + lin
            mod = block.get_submodule(lin)
            w = mod.weight.detach().clone()
            types = options_for(candidates, w.shape[1])
            h = stats.of(name).hessian if stats is not None else None
            errors[name] = {}
            ref = reference if reference in types else _middle(types, w.shape, fmt, scale_dtype)
            for t in types:
                wq = quantize_as(w, t, method, h, scale_dtype).dequantize()
                with torch.no_grad():
                    mod.weight.copy_(wq)
                errors[name][t] = float((run(block, x) - y).square().sum(-1).mean())
                if t == ref:
                    ref_w[lin] = wq
            with torch.no_grad():
                mod.weight.copy_(w)
        with torch.no_grad():  # the probe: every linear of the block at the reference type
            saved = {lin: block.get_submodule(lin).weight.detach().clone() for lin in ref_w}
            for lin, wq in ref_w.items():
                block.get_submodule(lin).weight.copy_(wq)
            yq = run(block, x)
            for lin, w in saved.items():
                block.get_submodule(lin).weight.copy_(w)
        probe_size[j] = float((yq - y).square().sum(-1).mean())
        probes[j] = yq
        x = y
        release(block)
        progress("measure", j + 1, n + 2)
    norm = skel.model.norm
    norm.to_empty(device="cpu")
    with torch.no_grad():
        norm.weight.copy_(source.get(arch.final_norm).float())
    tied = cfg.tie_word_embeddings
    head = embed if tied else source.get(arch.lm_head).float()
    with torch.no_grad():
        hf = norm(x)
        sens = {j: logit_kld(hf, norm(p), head)[0] / max(probe_size[j], 1e-30) for j, p in probes.items()}
    result: dict[str, list[Option]] = {}
    for name, errs in errors.items():
        j = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
        shape = tuple(source.shape(name + ".weight"))
        result[name] = [Option(t, fmt.tensor_bytes(codec(t, scale_dtype), shape, scale_dtype), sens[j] * e)
                        for t, e in errs.items()]
    progress("measure", n + 1, n + 2)
    if fmt.name == "gguf":  # the embeddings and the head, measured directly
        result.update(_embed_and_head(source, skel, runner, arch, ids, embed, head, hf, norm, candidates, fmt, tied,
                                      run, materialize, release, logit_kld))
    progress("measure", n + 2, n + 2)
    return result, {"block_sensitivity": sens, "probe_size": probe_size, "tokens": int(ids.numel())}


def _middle(types: list[str], shape, fmt, scale_dtype) -> str:
    """The candidate of median size: probes perturb by an error of the size the plans mostly pick."""
    from qtool.formats.registry import codec

    by_size = sorted(types, key=lambda t: (fmt.tensor_bytes(codec(t, scale_dtype), shape, scale_dtype), t))
    return by_size[(len(by_size) - 1) // 2]


def _embed_and_head(source, skel, runner, arch, ids, embed, head, hf, norm, candidates, fmt, tied, run,
                    materialize, release, logit_kld) -> dict[str, list[Option]]:
    """KL with the embeddings alone quantized (each candidate; its stream through every block) and, untied,
    with the head alone quantized."""
    from qtool.formats.registry import codec

    out = {}
    types = options_for(candidates, embed.shape[1])
    streams = {t: codec(t).encode(embed).dequantize()[ids] for t in types}  # rows only: one table at a time
    for j in range(source.config.num_hidden_layers):
        prefix = arch.block_prefix(j)
        block = materialize(skel.get_submodule(prefix.rstrip(".")), prefix, source)
        for t in streams:
            streams[t] = run(block, streams[t])
        release(block)
    with torch.no_grad():  # a tied table is the head too: decoded again, one at a time
        costs = {t: logit_kld(hf, norm(s), head, codec(t).encode(embed).dequantize() if tied else None)[0]
                 for t, s in streams.items()}
    out[EMBED] = [Option(t, fmt.tensor_bytes(codec(t), tuple(embed.shape)), c) for t, c in costs.items()]
    if not tied:
        types = options_for(candidates, head.shape[1])
        with torch.no_grad():
            costs = {t: logit_kld(hf, hf, head, codec(t).encode(head).dequantize())[0] for t in types}
        out[HEAD] = [Option(t, fmt.tensor_bytes(codec(t), tuple(head.shape)), c) for t, c in costs.items()]
    return out
