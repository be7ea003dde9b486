"""Calibration statistics: collected once by `qtool calibrate`, reused by `quantize --stats`.

A stats directory holds

* ``stats.safetensors``: per linear *input* (linears that read the same activations share one entry, keyed
  by the first of them, e.g. q/k/v by ``...self_attn.q_proj``): ``<key>.hessian`` XᵀX/N (in, in) for GPTQ,
  ``<key>.abs_mean`` mean |x| (AWQ), ``<key>.sq_mean`` mean x² (imatrix), ``<key>.absmax`` max |x|
  (SmoothQuant, LLM.int8), all float32;
* ``manifest.json``: the model digest, the calibration spec and the digest of its token ids, the token
  count, and which key each linear reads (``inputs``).

The statistics are of the **float** model (each block fed the float outputs of the block before). A
`quantize --stats` run uses them instead of a calibration pass: one-shot, much faster; an inline run
collects them on the partly quantized stream (sequential, slightly better quality).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from qtool.errors import ModelError, UsageError

FORMAT = 1
HEAD_INPUT = "lm_head"  # key of the output head's input statistics (files written before it lack it)
KINDS = ("hessian", "abs_mean", "sq_mean", "absmax")


@dataclass(frozen=True)
class InputStats:
    hessian: torch.Tensor  # XᵀX / N
    abs_mean: torch.Tensor
    sq_mean: torch.Tensor
    absmax: torch.Tensor


@dataclass
class Stats:
    model_digest: str
    calibration: dict  # the Calibration used (source, samples, seq_len, seed) + data_digest of its source
    tokens_digest: str
    tokens: int
    inputs: dict[str, str]  # linear -> key of the input it reads
    tensors: dict[str, InputStats]  # key -> statistics

    def of(self, linear: str) -> InputStats:
        return self.tensors[self.inputs[linear]]

    def check(self, model_digest: str, calibration=None, where: str = "--stats") -> None:
        """Refuse statistics of another model, or of another calibration spec than `calibration` (a plan's
        `Calibration`; None = the plan states none, the statistics' own spec is taken), naming the mismatch."""
        if model_digest != self.model_digest:
            raise UsageError(f"{where}: statistics were collected on another model "
                             f"(model digest {self.model_digest[:12]}, this model {model_digest[:12]}); "
                             "run `qtool calibrate` on this model")
        if calibration is None:
            return
        from qtool.calib.data import source_digest

        want = {"samples": calibration.samples, "seq_len": calibration.seq_len, "seed": calibration.seed,
                "data_digest": source_digest(calibration)}
        have = {k: self.calibration.get(k) for k in want}
        diff = [f"{k}: stats {have[k]!r} vs plan {want[k]!r}" for k in want if have[k] != want[k]]
        if diff:
            raise UsageError(f"{where}: statistics were collected with another calibration spec "
                             f"({'; '.join(diff)}); rerun `qtool calibrate` with the plan's settings")


def tokens_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def collect(source, calibration, *, progress: Callable[[str, int, int], None] | None = None,
            batch: int = 8) -> Stats:
    """Run the calibration tokens through the float model block by block (memory: one block + activations +
    embeddings) and gather every linear input's statistics."""
    from qtool.calib.data import calibration_tokens
    from qtool.calib.hessian import HessianCollector
    from qtool.calib.precision import bf16_stream
    from qtool.engine.blocks import BlockRunner, materialize, release, skeleton
    from qtool.io.arch import arch_of

    progress = progress or (lambda stage, done, total: None)
    cfg = source.config
    arch = arch_of(cfg)
    tokenizer = source.load_tokenizer()
    progress("tokens", 0, 1)
    ids = calibration_tokens(source, calibration, tokenizer)
    progress("tokens", 1, 1)
    x = source.get(arch.embed).float()[ids]
    skel = skeleton(cfg)
    runner = BlockRunner(skel, cfg, calibration.seq_len)
    inputs, tensors = {}, {}
    n = cfg.num_hidden_layers
    for i in range(n):
        prefix = arch.block_prefix(i)
        block = materialize(skel.get_submodule(prefix.rstrip(".")), prefix, source)
        firsts = [g[0] for g in arch.linear_groups]
        collector = HessianCollector(block, firsts, early_stop=False, precision=calibration.precision)
        outs = []
        with bf16_stream(block, calibration.precision):
            hess = collector.run(lambda b: outs.append(runner(block, b)), x.split(batch))
        x = torch.cat(outs)
        for g in arch.linear_groups:
            key = prefix + g[0]
            for lin in g:
                inputs[prefix + lin] = key
            hg = hess[g[0]]
            tensors[key] = InputStats(hg, collector.abs_mean[g[0]], hg.diagonal().clone(),
                                       collector.absmax[g[0]])
        release(block)
        progress("calibrate", i + 1, n)
    # the output head's input (the final norm's output): its statistics price the head (qtool sensitivity)
    norm = skel.model.norm
    norm.to_empty(device="cpu")
    with torch.no_grad():
        norm.weight.copy_(source.get(arch.final_norm).float())
        xn = norm(x).reshape(-1, x.shape[-1]).float()
    inputs[HEAD_INPUT] = HEAD_INPUT
    tensors[HEAD_INPUT] = InputStats(xn.T @ xn / xn.shape[0], xn.abs().mean(0), xn.square().mean(0),
                                     xn.abs().amax(0))
    del xn
    from qtool.calib.data import source_digest

    spec = asdict(calibration)
    if spec["source"] != "generated" and not spec["source"].startswith("hf:"):
        spec["source"] = str(Path(spec["source"]).resolve())
    spec["data_digest"] = source_digest(calibration)
    return Stats(source.digest(), spec, tokens_digest(ids), int(ids.numel()), inputs, tensors)


def save(stats: Stats, out: Path, *, force: bool = False) -> None:
    """Write `out`/stats.safetensors + manifest.json atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        flat = {f"{key}.{kind}": getattr(st, kind).contiguous() for key, st in sorted(stats.tensors.items())
                for kind in KINDS}
        # one metadata key only: safetensors writes __metadata__ from a hash map (key order varies per process)
        save_file(flat, str(tmp / "stats.safetensors"), metadata={"format": "pt"})
        manifest = {"format": FORMAT, "model_digest": stats.model_digest, "calibration": stats.calibration,
                    "tokens_digest": stats.tokens_digest, "tokens": stats.tokens, "inputs": stats.inputs}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: Path) -> Stats:
    """Read a stats directory written by `save`, validating it (no pickle: safetensors + JSON)."""
    from qtool.io.safetensors_source import read_header

    path = Path(path)
    man_p, st_p = path / "manifest.json", path / "stats.safetensors"
    if not man_p.is_file() or not st_p.is_file():
        raise UsageError(f"{path}: not a qtool stats directory (needs manifest.json and stats.safetensors; "
                         "make one with `qtool calibrate`)")
    try:
        man = json.loads(man_p.read_text())
        if man.get("format") != FORMAT:
            raise ModelError(f"{man_p}: stats format {man.get('format')!r}, this qtool reads {FORMAT}")
        inputs, calibration = dict(man["inputs"]), dict(man["calibration"])
        model_digest, tok_digest, n_tok = str(man["model_digest"]), str(man["tokens_digest"]), int(man["tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{man_p}: corrupt stats manifest ({e})") from None
    header = read_header(st_p)  # validates offsets and sizes before any tensor is read
    from safetensors.torch import load_file

    flat = load_file(str(st_p))
    tensors = {}
    for key in sorted(set(inputs.values())):
        try:
            parts = {kind: flat[f"{key}.{kind}"].float() for kind in KINDS}
        except KeyError as e:
            raise ModelError(f"{st_p}: missing tensor {e.args[0]}") from None
        n = parts["abs_mean"].shape[0]
        if parts["hessian"].shape != (n, n) or any(parts[k].shape != (n,) for k in ("sq_mean", "absmax")):
            raise ModelError(f"{st_p}: {key}: inconsistent statistic shapes")
        if not all(torch.isfinite(t).all() for t in parts.values()):
            raise ModelError(f"{st_p}: {key}: NaN/Inf in the statistics")
        tensors[key] = InputStats(**parts)
    del header
    return Stats(model_digest, calibration, tok_digest, n_tok, inputs, tensors)


def write_imatrix(stats: Stats, path: Path, n_layers: int, dataset: str) -> None:
    """Write the statistics' mean x² as a llama.cpp importance matrix (GGUF, or legacy `.dat` by suffix)."""
    from qtool.calib import imatrix

    entries = {}
    for lin, key in sorted(stats.inputs.items()):
        if lin == HEAD_INPUT:  # llama-imatrix records no head entry for tied models; keep files like its own
            continue
        entries[imatrix.hf_to_gguf_name(lin, n_layers)] = (stats.tensors[key].sq_mean * stats.tokens, stats.tokens)
    chunks = int(stats.calibration["samples"])
    if Path(path).suffix == ".dat":
        imatrix.write_imatrix_dat(path, entries, chunk_count=chunks, dataset=dataset)
    else:
        imatrix.write_imatrix_gguf(path, entries, datasets=[dataset], chunk_count=chunks,
                                   chunk_size=int(stats.calibration["seq_len"]))
