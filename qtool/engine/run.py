"""The one streaming loop: load a block, quantize its linears, write, carry activations, next block.

Peak memory is one decoder block + the embeddings + the self-check activations, never the whole model.
The self-check carries a float and a quantized activation stream through every block on a few held-out
sequences and reports, at the end, the final-logit KL divergence and same-top % against the base plus the
worst layers by output error: the silent "model outputs gibberish" failure is caught by every run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qtool.calib.precision import effective
from qtool.engine.blocks import BlockRunner, malloc_trim, materialize, release, skeleton
from qtool.engine.check import CheckReport, check_tokens, logit_kld
from qtool.outputs import output_format
from qtool.engine.staged import StagedBlock
from qtool.engine.transforms import TransformReport, apply_transforms, block_stats
from qtool.errors import ModelError, UsageError
from qtool.formats.base import QTensor
from qtool.io.arch import arch_of
from qtool.io.source import ModelSource
from qtool.methods import METHODS
from qtool.plan import EMBED, HEAD, LayerSpec, Plan

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class LayerReport:
    name: str
    codec: str
    bytes: int
    weight_rel_err: float  # ||W - Wq|| / ||W||
    output_rel_err: float | None = None  # ||X(W - Wq)^T|| / ||XW^T|| on the check inputs
    note: str = ""


@dataclass
class Manifest:
    out: str
    plan_digest: str
    output_format: str
    quantized_params: int
    quantized_bytes: int
    total_bytes: int
    bits_per_weight: float
    seconds: float
    layers: list[LayerReport] = field(default_factory=list)
    transforms: list[TransformReport] = field(default_factory=list)
    check: CheckReport | None = None
    warnings: list[str] = field(default_factory=list)

    def worst_layers(self, k: int = 5) -> list[LayerReport]:
        key = (lambda r: r.output_rel_err if r.output_rel_err is not None else r.weight_rel_err) if self.check \
            else (lambda r: r.weight_rel_err)
        return sorted(self.layers, key=key, reverse=True)[:k]

    def to_json(self) -> dict:
        d = asdict(self)
        if self.check:
            d["check"]["ok"] = self.check.ok
        return d


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ModelError(f"tensor {name} holds {bad} NaN/Inf values; refusing to quantize it")
    return t


def run(source: ModelSource, plan: Plan, out: Path, *, force: bool = False, check: bool = True,
        progress: Progress | None = None, stats=None, imatrix: Path | None = None) -> Manifest:
    """Quantize `source` with `plan` into `out` (an HF directory, or a .gguf file for GGUF plans; atomically).

    `stats` (`calib.stats.Stats` of this model, from `qtool calibrate`) replaces the calibration pass;
    `imatrix` (an importance matrix file: `qtool calibrate --imatrix` or llama.cpp's llama-imatrix) gives the
    GGUF codecs their importance."""
    t0 = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    cfg = source.config
    try:
        arch = arch_of(cfg)
    except ModelError as e:
        raise ModelError(f"{source.path}: {e}") from None
    n_layers = cfg.num_hidden_layers
    out_fmt = output_format(plan.output_format)
    gguf_out = plan.output_format == "gguf"

    # -- everything that can fail on the user's input fails here, before any work
    shapes = {}
    for i in range(n_layers):
        for lin in arch.linears:
            name = arch.block_prefix(i) + lin
            try:
                shapes[name] = source.shape(name + ".weight")
            except KeyError:
                raise ModelError(f"{source.path}: tensor {name}.weight is missing") from None
    if gguf_out:  # GGUF quantizes the token embeddings and the output head too
        shapes[EMBED] = source.shape(arch.embed)
        if not cfg.tie_word_embeddings and arch.lm_head in source.names():
            shapes[HEAD] = source.shape(arch.lm_head)
    dtype = _float_dtype(source, plan)
    if imatrix is not None:
        from qtool.calib.imatrix import read_imatrix

        imatrix_path, imatrix = imatrix, read_imatrix(imatrix)  # a corrupt file is refused before any work
    mix = _gguf_mix(plan, cfg, arch, shapes, has_importance=bool(imatrix) or plan.needs_calibration) if gguf_out else None
    specs: dict[str, LayerSpec] = plan.resolve(shapes, dtype, mix=mix)
    if not specs:
        raise UsageError(f"{plan.source}: no rule matches any linear of this model "
                         f"(names look like {next(iter(shapes))})")
    unquantized = sorted(set(shapes) - set(specs)) + ([] if gguf_out else ["lm_head"])
    qconfig = out_fmt.config(specs, unquantized, dtype)  # a plan the format cannot hold fails before any work
    importance = _imatrix_importance(imatrix, specs, n_layers, arch) if imatrix is not None else {}
    inputs = (source.path,) + ((Path(plan.source),) if plan.source != "<flags>" else ())
    if gguf_out:
        from qtool.engine.sinks import GGUFSink
        from qtool.io.gguf_writer import GGUF_FLOAT

        sink = GGUFSink(out, source=source, arch=arch, plan=plan, force=force, inputs=inputs,
                        float_type=GGUF_FLOAT[dtype])
        if imatrix is not None:
            sink.imatrix = {"file": Path(imatrix_path).name, "dataset": ",".join(imatrix.datasets),
                            "entries": len(imatrix.means), "chunks": imatrix.chunk_count}
    else:
        from qtool.engine.sinks import HFSink

        sink = HFSink(out, out_fmt, force=force, inputs=inputs, dtype=dtype)
    try:
        manifest = _stream(source, plan, specs, shapes, arch, sink, check, progress, stats, importance)
        if plan.needs_calibration and stats is None and effective(plan.calibration.precision) != plan.calibration.precision:
            manifest.warnings.append(f"calibration.precision {plan.calibration.precision}: this CPU has no bf16 "
                                     "matmul support, the calibration pass ran in fp32")
        manifest.warnings += sorted({why for s in specs.values()  # a method with a native kernel: why its twin ran
                                     if (slow := getattr(METHODS[s.method], "native_unavailable", None))
                                     for why in [slow(s.codec)] if why})
        manifest.seconds = round(time.perf_counter() - t0, 2)
        sink.finish(source=source, plan=plan, manifest=manifest, qconfig=qconfig)
    except BaseException:
        sink.abort()
        raise
    manifest.out = str(out)
    return manifest


def _float_dtype(source: ModelSource, plan: Plan) -> torch.dtype:
    """The float dtype of unquantized tensors: the plan's, else the source's own width (a quantized GGUF
    source: bfloat16, which holds every value its blocks decode to within bf16 rounding)."""
    if plan.dtype != "auto":
        return getattr(torch, plan.dtype)
    if plan.output_format == "gguf":  # HF artifacts of a GGUF source still hold float32 (their scales follow it)
        return getattr(source, "float_dtype", source.dtype)
    return source.dtype


def _gguf_mix(plan: Plan, cfg, arch, shapes: dict, has_importance: bool) -> dict:
    """HF module name -> the `TypeChoice` llama.cpp's named mix gives it (GGUF names in between)."""
    from qtool.formats.gguf_mixes import mix_types
    from qtool.io.gguf_model import tensor_namer

    namer = tensor_namer(arch, cfg.num_hidden_layers)
    gnames = {m: namer(m + ".weight") for m in shapes}
    n_head = cfg.num_attention_heads
    types = mix_types(plan.gguf_type, {gnames[m]: s for m, s in shapes.items()}, n_layer=cfg.num_hidden_layers,
                      n_head=n_head, n_head_kv=getattr(cfg, "num_key_value_heads", None) or n_head,
                      has_imatrix=has_importance)
    return {m: types[g] for m, g in gnames.items() if g in types}


def _imatrix_importance(imatrix, specs: dict, n_layers: int, arch) -> dict[str, torch.Tensor]:
    """HF module name -> mean x² per input column, from an importance matrix keyed by GGUF names."""
    from qtool.io.gguf_model import tensor_namer

    namer = tensor_namer(arch, n_layers)
    out = {}
    for module in specs:
        g = namer(module + ".weight")
        if g in imatrix.means:
            out[module] = imatrix.means[g].float()
    return out


def _quantize_linear(block, prefix, lin, spec, hessian, x, sink, out_fmt, importance=None) -> LayerReport:
    """Quantize one linear through its method and codec, write it, and leave its dequantized weight in
    the block so the activations that follow see the quantized model (a linear with int8 activations is
    replaced by the runtime module that quantizes its inputs, `runtime/w8a8.py`, built from the written
    tensors: the check and calibration streams then run what `qtool eval` and the real clients run)."""
    p = block.get_submodule(lin).weight
    module = prefix + lin
    w = _finite(module + ".weight", p.detach())
    if importance is None and hessian is not None:
        importance = torch.diagonal(hessian).float()
    qt, note = quantize_weight(w, spec, hessian, importance)
    wq = qt.dequantize()
    packed, nbytes = sink.add_quantized(module, qt, spec)
    report = LayerReport(module, qt.codec.name, nbytes, ((w - wq).norm() / w.norm().clamp_min(1e-12)).item(),
                         note=note)
    runtime = _runtime_linear(block.get_submodule(lin), spec, packed, out_fmt)
    if x is not None:
        y = x @ w.T
        yq = x @ wq.T if runtime is None else runtime(x)
        report.output_rel_err = ((y - yq).norm() / y.norm().clamp_min(1e-12)).item()
    with torch.no_grad():
        p.copy_(wq)
    if runtime is not None:
        parent, _, attr = lin.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, runtime)
    return report


def quantize_weight(w: torch.Tensor, spec: LayerSpec, hessian=None, importance=None) -> tuple[QTensor, str]:
    """One weight through its method and codec. A GGUF shape fallback with candidates (`LayerSpec.candidates`)
    keeps the candidate with the least importance-weighted RTN error, then runs the method with it."""
    method = METHODS[spec.method]
    codec = spec.codec
    note = spec.note
    if spec.candidates:
        codec, why = _least_error(w, spec, importance)
        note = "; ".join(filter(None, [note, why]))
    if method.NEEDS:
        qt, rep = method.quantize(w, codec, hessian, method.params_of(spec))
        note = "; ".join(filter(None, [note, rep.note]))
    elif codec.grid_kind == "block":  # GGUF codecs weight their search by the importance; rows encode
        # independently, so a vocabulary-sized tensor goes a chunk of rows at a time (memory: one chunk, not 3x it)
        from qtool.formats.gguf_base import row_chunks

        qt = QTensor.cat_rows([method.quantize(w[r], codec, importance) for r in row_chunks(*w.shape, ENCODE_CHUNK)])
    else:
        qt = method.quantize(w, codec)
    return qt, note


ENCODE_CHUNK = 1 << 23  # elements per row chunk when a block codec encodes a large tensor (32 MiB in float32)
SAMPLE_ROWS = 256  # rows on which the fallback candidates are compared (evenly spaced; all rows when fewer)


def _least_error(w: torch.Tensor, spec: LayerSpec, importance) -> tuple:
    """The candidate with the least importance-weighted RTN error, measured on `SAMPLE_ROWS` evenly spaced rows
    (rows are encoded independently: a sample estimates the whole tensor's error at a fraction of the cost)."""
    imp = torch.ones(w.shape[1]) if importance is None else importance.float().clamp_min(0)
    from qtool.formats.base import evenly_spaced_rows

    rows = evenly_spaced_rows(w, SAMPLE_ROWS)
    errs = {}
    for c in spec.candidates:
        d = rows - c.encode(rows, importance).dequantize()
        errs[c] = float((d.square() * imp).sum())
    best = min(spec.candidates, key=lambda c: (errs[c], c.name))
    base = errs.get(spec.codec)
    why = f"chose {best.name.upper()} (error {errs[best]:.4g}" + (
        f" vs {spec.codec.name.upper()} {base:.4g})" if base is not None and best != spec.codec else ")")
    return best, why


def _runtime_quantizes_inputs(spec: LayerSpec) -> bool:
    return spec.rule is not None and spec.rule.activations != "none"


def _runtime_linear(linear, spec: LayerSpec, packed: dict, fmt):
    """The module a loader builds from `packed` when the rule quantizes inputs (`fmt.int8_runtime`), else None."""
    if not _runtime_quantizes_inputs(spec):
        return None
    return fmt.int8_runtime(packed, None if linear.bias is None else linear.bias.detach().clone(), spec)


def _uses_block_stats(spec: LayerSpec) -> bool:
    return bool(spec.rule.transforms) or (bool(METHODS[spec.method].NEEDS) and not METHODS[spec.method].SEQUENTIAL)


def _needs_block_hessian(spec: LayerSpec) -> bool:
    """XᵀX of the float block: AWQ's search, and weight methods that read it without a sequential pass."""
    m = METHODS[spec.method]
    return "awq" in spec.rule.transforms or ("hessian" in m.NEEDS and not m.SEQUENTIAL)


def _stream(source, plan, specs, shapes, arch, sink, check, progress, stats_file=None, importance=None) -> Manifest:
    cfg = source.config
    n_layers = cfg.num_hidden_layers
    out_fmt = output_format(plan.output_format)
    importance = importance or {}
    # GGUF plans with calibration: every codec weights its search by diag(XᵀX) of its inputs (an imatrix)
    gguf_importance = plan.output_format == "gguf" and plan.needs_calibration and not importance
    skel = skeleton(cfg)
    reports: list[LayerReport] = []
    embed = _finite(arch.embed, source.get(arch.embed))
    embed_qt = None  # GGUF: the quantized embeddings, decoded only where needed (token lookups, the check's head)
    if EMBED in specs:  # GGUF: the token embeddings are quantized too (no importance: llama.cpp has none for them)
        embed_qt, note = quantize_weight(embed, specs[EMBED])
        _, nbytes = sink.add_quantized(EMBED, embed_qt, specs[EMBED])
        reports.append(LayerReport(EMBED, embed_qt.codec.name, nbytes, _rel_q(embed, embed_qt), note=note))
    else:
        sink.add_float(arch.embed, embed)

    def embed_q(ids: torch.Tensor) -> torch.Tensor:  # what the quantized model's embedding gives these tokens
        return embed[ids].float() if embed_qt is None else _lookup(embed_qt, ids)
    check = check and plan.check_sequences > 0
    inline = plan.needs_calibration and stats_file is None  # collect statistics on a calibration stream
    tokenizer = source.load_tokenizer() if check or inline else None
    if check:
        ids = check_tokens(tokenizer, plan.check_sequences, plan.check_seq_len)
        xf = embed[ids].float()
        xq = embed_q(ids)
        runner = BlockRunner(skel, cfg, plan.check_seq_len)
    xc = None
    if inline:
        from qtool.calib.data import calibration_tokens

        progress("calibrate", 0, 1)
        cids = calibration_tokens(source, plan.calibration, tokenizer)
        xc = embed_q(cids)  # the calibration stream: quantized blocks' outputs feed the next block
        crunner = BlockRunner(skel, cfg, plan.calibration.seq_len)
        progress("calibrate", 1, 1)
    tied_qt = embed_qt if cfg.tie_word_embeddings else None  # the head a tied GGUF model runs
    del embed, embed_qt, embed_q, tokenizer
    malloc_trim()  # the tokenizer's and the embedding's temporaries: not under the stream's peak
    transforms: list[TransformReport] = []
    block_err: list[float] = []
    for i in range(n_layers):
        prefix = arch.block_prefix(i)
        block = materialize(skel.get_submodule(prefix.rstrip(".")), prefix, source)
        stats: dict[str, tuple] = {}  # statistics of the float block's inputs (AWQ search and clip)
        block_wide = [lin for lin in arch.linears if prefix + lin in specs
                      and (_uses_block_stats(specs[prefix + lin]) or gguf_importance)]
        if stats_file is not None and plan.needs_calibration:
            stats = {lin: (s.hessian, s.abs_mean, s.absmax) for lin in arch.linears if prefix + lin in specs
                     for s in [stats_file.of(prefix + lin)]}
        elif xc is not None and block_wide:
            need_h = gguf_importance or any(_needs_block_hessian(specs[prefix + lin]) for lin in block_wide)
            stats = block_stats(block, arch, block_wide, lambda b: crunner(block, b), xc.split(8), hessian=need_h,
                                precision=plan.calibration.precision)
        if stats:  # transforms first: the float block keeps its function, later steps see the result
            transforms += apply_transforms(block, prefix, arch, specs, stats)
        inputs: dict[str, torch.Tensor] = {}
        if check:
            hooks = [block.get_submodule(lin).register_forward_pre_hook(
                lambda m, a, lin=lin: inputs.__setitem__(lin, a[0].reshape(-1, a[0].shape[-1])))
                for lin in arch.linears if prefix + lin in specs]
            xf = runner(block, xf)
            for h in hooks:
                h.remove()
        for name, p in block.named_parameters():
            if prefix + name.removesuffix(".weight") not in specs or not name.endswith(".weight"):
                sink.add_float(prefix + name, _finite(prefix + name, p.detach()))
        w8a8 = any(_runtime_quantizes_inputs(specs[prefix + lin]) for lin in arch.linears if prefix + lin in specs)
        staged = StagedBlock(block, arch, crunner, xc, precision=plan.calibration.precision,
                             keep_bf16=not w8a8) if xc is not None else None
        for gi, group in enumerate(arch.linear_groups):  # true-sequential: later groups see earlier ones quantized
            members = [lin for lin in group if prefix + lin in specs]
            hessians = {lin: stats[lin][0] for lin in members if lin in stats}
            sequential = [lin for lin in members if METHODS[specs[prefix + lin].method].SEQUENTIAL]
            if staged is not None and sequential:  # GPTQ: H of the inputs the partly quantized block produces
                h = staged.hessian(gi, prefix + group[0])
                hessians.update({lin: h for lin in sequential})
            for lin in members:
                reports.append(_quantize_linear(block, prefix, lin, specs[prefix + lin], hessians.get(lin),
                                                inputs.get(lin), sink, out_fmt, importance.get(prefix + lin)))
        if staged is not None:
            xc = staged.output()
        if check:
            yq = runner(block, xq)
            block_err.append(((yq - xf).norm() / xf.norm().clamp_min(1e-12)).item())
            xq = yq
        release(block)
        staged = None
        progress("quantize", i + 1, n_layers)
    norm_w = source.get(arch.final_norm).float()
    head_qt = tied_qt
    if HEAD in specs:  # GGUF: the output head, weighted by the importance of its inputs (the final norm's output)
        head = _finite(arch.lm_head, source.get(arch.lm_head))
        imp = importance.get(HEAD)
        if imp is None and xc is not None:
            imp = _final_norm(skel, norm_w)(xc).reshape(-1, xc.shape[-1]).square().mean(0)
        head_qt, note = quantize_weight(head, specs[HEAD], importance=imp)
        _, nbytes = sink.add_quantized(HEAD, head_qt, specs[HEAD])
        reports.append(LayerReport(HEAD, head_qt.codec.name, nbytes, _rel_q(head, head_qt), note=note))
        del head
    xc = None  # the calibration stream is done: free it before the check's logits
    linears = [r for r in reports if r.name not in (EMBED, HEAD)]
    q_params = sum(shapes[r.name][0] * shapes[r.name][1] for r in linears)
    q_bytes = sum(r.bytes for r in linears)
    for name in (arch.final_norm,) + (() if cfg.tie_word_embeddings or HEAD in specs else (arch.lm_head,)):
        if name in source.names():
            sink.add_float(name, _finite(name, source.get(name)))
    report = None
    if check:
        head = source.get(arch.embed if cfg.tie_word_embeddings else arch.lm_head).float()
        head_q = None if head_qt is None else head_qt.dequantize()
        norm = _final_norm(skel, norm_w)
        with torch.no_grad():
            kld, same = logit_kld(norm(xf), norm(xq), head, head_q)
        report = CheckReport(round(kld, 6), round(same, 3), [round(e, 6) for e in block_err],
                             plan.check_sequences, plan.check_seq_len, plan.warn_kld)
    return Manifest(out="", plan_digest=plan.digest(), output_format=plan.output_format,
                    quantized_params=q_params, quantized_bytes=q_bytes, total_bytes=0,
                    bits_per_weight=round(8 * q_bytes / max(q_params, 1), 4), seconds=0.0,
                    layers=reports, transforms=transforms, check=report)


def _rel_q(w: torch.Tensor, qt: QTensor) -> float:
    """||w - dequantize(qt)|| / ||w||, decoded a row chunk at a time (vocabulary-sized tensors)."""
    from qtool.formats.gguf_base import row_chunks

    if qt.codec.grid_kind != "block":
        return ((w - qt.dequantize()).norm() / w.norm().clamp_min(1e-12)).item()
    err = ref = 0.0
    for r in row_chunks(*qt.shape):
        wr = w[r].float()
        err += float((wr - qt.take_rows(r).dequantize()).square().sum(dtype=torch.float64))
        ref += float(wr.square().sum(dtype=torch.float64))
    return (err / max(ref, 1e-24)) ** 0.5


def _lookup(qt: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a quantized embedding, decoding only the distinct rows they use."""
    uniq, inv = ids.reshape(-1).unique(return_inverse=True)
    return qt.take_rows(uniq).dequantize()[inv].reshape(*ids.shape, qt.shape[1])


def _final_norm(skel, weight: torch.Tensor):
    norm = skel.model.norm
    norm.to_empty(device="cpu")
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm
