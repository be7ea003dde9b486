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
from qtool.engine.output import OUTPUTS
from qtool.engine.staged import StagedBlock
from qtool.engine.transforms import TransformReport, apply_transforms, block_stats
from qtool.errors import ModelError, UsageError
from qtool.io.arch import arch_of
from qtool.io.hf_writer import HFWriter
from qtool.io.source import ModelSource
from qtool.methods import METHODS
from qtool.plan import LayerSpec, Plan

Progress = Callable[[str, int, int], None]  # (stage, done, total)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


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
        key = (lambda r: r.output_rel_err) if self.check else (lambda r: r.weight_rel_err)
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
        progress: Progress | None = None, stats=None) -> Manifest:
    """Quantize `source` with `plan` into the HF directory `out` (atomically). Returns the manifest.

    `stats` (`calib.stats.Stats` of this model, from `qtool calibrate`) replaces the calibration pass."""
    t0 = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    cfg = source.config
    try:
        arch = arch_of(cfg)
    except ModelError as e:
        raise ModelError(f"{source.path}: {e}") from None
    n_layers = cfg.num_hidden_layers
    out_fmt = OUTPUTS[plan.output_format]

    # -- everything that can fail on the user's input fails here, before any work
    shapes = {}
    for i in range(n_layers):
        for lin in arch.linears:
            name = arch.block_prefix(i) + lin
            try:
                shapes[name] = source.shape(name + ".weight")
            except KeyError:
                raise ModelError(f"{source.path}: tensor {name}.weight is missing") from None
    dtype = source.dtype if plan.dtype == "auto" else getattr(torch, plan.dtype)
    specs: dict[str, LayerSpec] = plan.resolve(shapes, dtype)
    if not specs:
        raise UsageError(f"{plan.source}: no rule matches any linear of this model "
                         f"(names look like {next(iter(shapes))})")
    unquantized = sorted(set(shapes) - set(specs)) + ["lm_head"]
    qconfig = out_fmt.config(specs, unquantized, dtype)  # a plan the format cannot hold fails before any work
    inputs = (source.path,) + ((Path(plan.source),) if plan.source != "<flags>" else ())
    writer = HFWriter(out, force=force, inputs=inputs)  # refuses an existing output or one that is an input
    try:
        manifest = _stream(source, plan, specs, shapes, arch, writer, dtype, check, progress, stats)
        config = cfg.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config["quantization_config"] = qconfig
        warning = out_fmt.warning(config["quantization_config"])
        manifest.warnings += [warning] if warning else []
        if plan.needs_calibration and stats is None and effective(plan.calibration.precision) != plan.calibration.precision:
            manifest.warnings.append(f"calibration.precision {plan.calibration.precision}: this CPU has no bf16 "
                                     "matmul support, the calibration pass ran in fp32")
        manifest.warnings += sorted({why for s in specs.values()  # a method with a native kernel: why its twin ran
                                     if (slow := getattr(METHODS[s.method], "native_unavailable", None))
                                     for why in [slow(s.codec)] if why})
        _copy_tokenizer(source, writer)
        writer.add_file("qtool_plan.yaml", plan.to_yaml())
        manifest.total_bytes = writer.total_bytes
        manifest.seconds = round(time.perf_counter() - t0, 2)
        body = manifest.to_json()
        body.pop("seconds"), body.pop("out")  # keep the artifact byte-identical across runs and paths
        writer.add_file("qtool_manifest.json", json.dumps(body, indent=2, sort_keys=True) + "\n")
        writer.finish(config)
    except BaseException:
        writer.abort()
        raise
    manifest.out = str(out)
    return manifest


def _copy_tokenizer(source: ModelSource, writer: HFWriter) -> None:
    src_dir = source.path if source.path.is_dir() else None
    if src_dir is None:
        source.save_tokenizer(writer.tmp)
        return
    for fname in TOKENIZER_FILES:
        if (src_dir / fname).is_file():
            writer.add_file(fname, (src_dir / fname).read_bytes())


def _quantize_linear(block, prefix, lin, spec, hessian, x, writer, out_fmt, dtype) -> LayerReport:
    """Quantize one linear through its method and codec, write it, and leave its dequantized weight in
    the block so the activations that follow see the quantized model (a linear with int8 activations is
    replaced by the runtime module that quantizes its inputs, `runtime/w8a8.py`, built from the written
    tensors: the check and calibration streams then run what `qtool eval` and the real clients run)."""
    p = block.get_submodule(lin).weight
    module = prefix + lin
    w = _finite(module + ".weight", p.detach())
    method = METHODS[spec.method]
    note = spec.note
    if method.NEEDS:
        qt, rep = method.quantize(w, spec.codec, hessian, method.params_of(spec))
        note = "; ".join(filter(None, [note, rep.note]))
    else:
        qt = method.quantize(w, spec.codec)
    wq = qt.dequantize()
    packed = out_fmt.pack(qt, dtype, spec)
    for key, t in packed.items():
        writer.add(f"{module}.{key}", t)
    nbytes = sum(t.numel() * t.element_size() for t in packed.values())  # what the file holds for it
    report = LayerReport(module, spec.codec.name, nbytes, ((w - wq).norm() / w.norm().clamp_min(1e-12)).item(),
                         note=note)
    runtime = _runtime_linear(block.get_submodule(lin), spec, packed, out_fmt.name)
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


def _runtime_quantizes_inputs(spec: LayerSpec) -> bool:
    return spec.rule is not None and spec.rule.activations != "none"


def _runtime_linear(linear, spec: LayerSpec, packed: dict, fmt: str):
    """The `Int8ActLinear` a loader builds from `packed` when the rule quantizes inputs, else None."""
    if not _runtime_quantizes_inputs(spec):
        return None
    from qtool.runtime.w8a8 import Int8ActLinear

    bias = None if linear.bias is None else linear.bias.detach().clone()
    if fmt == "bnb":
        return Int8ActLinear(packed["weight"], packed["SCB"], bias=bias, scheme="bnb",
                             threshold=spec.rule.outlier_threshold)
    return Int8ActLinear(packed["weight"], packed["weight_scale"], packed.get("weight_zero_point"), bias=bias,
                         scheme="ct")


def _uses_block_stats(spec: LayerSpec) -> bool:
    return bool(spec.rule.transforms) or (bool(METHODS[spec.method].NEEDS) and not METHODS[spec.method].SEQUENTIAL)


def _needs_block_hessian(spec: LayerSpec) -> bool:
    """XᵀX of the float block: AWQ's search, and weight methods that read it without a sequential pass."""
    m = METHODS[spec.method]
    return "awq" in spec.rule.transforms or ("hessian" in m.NEEDS and not m.SEQUENTIAL)


def _stream(source, plan, specs, shapes, arch, writer, dtype, check, progress, stats_file=None) -> Manifest:
    cfg = source.config
    n_layers = cfg.num_hidden_layers
    out_fmt = OUTPUTS[plan.output_format]
    skel = skeleton(cfg)
    embed = _finite(arch.embed, source.get(arch.embed))
    writer.add(arch.embed, embed.to(dtype))
    check = check and plan.check_sequences > 0
    inline = plan.needs_calibration and stats_file is None  # collect statistics on a calibration stream
    tokenizer = source.load_tokenizer() if check or inline else None
    if check:
        ids = check_tokens(tokenizer, plan.check_sequences, plan.check_seq_len)
        xf = embed[ids].float()
        xq = xf.clone()
        runner = BlockRunner(skel, cfg, plan.check_seq_len)
    xc = None
    if inline:
        from qtool.calib.data import calibration_tokens

        progress("calibrate", 0, 1)
        cids = calibration_tokens(source, plan.calibration, tokenizer)
        xc = embed[cids].float()  # the calibration stream: quantized blocks' outputs feed the next block
        crunner = BlockRunner(skel, cfg, plan.calibration.seq_len)
        progress("calibrate", 1, 1)
    del embed, tokenizer
    malloc_trim()  # the tokenizer's and the embedding's temporaries: not under the stream's peak
    reports: list[LayerReport] = []
    transforms: list[TransformReport] = []
    block_err: list[float] = []
    for i in range(n_layers):
        prefix = arch.block_prefix(i)
        block = materialize(skel.get_submodule(prefix.rstrip(".")), prefix, source)
        stats: dict[str, tuple] = {}  # statistics of the float block's inputs (AWQ search and clip)
        block_wide = [lin for lin in arch.linears if prefix + lin in specs and _uses_block_stats(specs[prefix + lin])]
        if stats_file is not None and plan.needs_calibration:
            stats = {lin: (s.hessian, s.abs_mean, s.absmax) for lin in arch.linears if prefix + lin in specs
                     for s in [stats_file.of(prefix + lin)]}
        elif xc is not None and block_wide:
            need_h = any(_needs_block_hessian(specs[prefix + lin]) for lin in block_wide)
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
                writer.add(prefix + name, _finite(prefix + name, p.detach()).to(dtype))
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
                                                inputs.get(lin), writer, out_fmt, dtype))
        if staged is not None:
            xc = staged.output()
        if check:
            yq = runner(block, xq)
            block_err.append(((yq - xf).norm() / xf.norm().clamp_min(1e-12)).item())
            xq = yq
        release(block)
        staged = None
        progress("quantize", i + 1, n_layers)
    xc = None  # the calibration stream is done: free it before the check's logits
    q_params = sum(shapes[r.name][0] * shapes[r.name][1] for r in reports)
    q_bytes = sum(r.bytes for r in reports)
    for name in (arch.final_norm,) + (() if cfg.tie_word_embeddings else (arch.lm_head,)):
        if name in source.names():
            writer.add(name, _finite(name, source.get(name)).to(dtype))
    report = None
    if check:
        norm_w = source.get(arch.final_norm).float()
        head = source.get(arch.embed if cfg.tie_word_embeddings else arch.lm_head).float()
        norm = skel.model.norm
        norm.to_empty(device="cpu")
        with torch.no_grad():
            norm.weight.copy_(norm_w)
            kld, same = logit_kld(norm(xf), norm(xq), head)
        report = CheckReport(round(kld, 6), round(same, 3), [round(e, 6) for e in block_err],
                             plan.check_sequences, plan.check_seq_len, plan.warn_kld)
    return Manifest(out="", plan_digest=plan.digest(), output_format=plan.output_format,
                    quantized_params=q_params, quantized_bytes=q_bytes, total_bytes=0,
                    bits_per_weight=round(8 * q_bytes / max(q_params, 1), 4), seconds=0.0,
                    layers=reports, transforms=transforms, check=report)
