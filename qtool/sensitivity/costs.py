"""Per-tensor costs of every candidate type (`qtool sensitivity --mode proxy`).

The cost of giving tensor T candidate c is the output error it causes *alone*, measured through the method the
plan will use (a GPTQ'd tensor costs less than a rounded one):

* a decoder linear W with input statistics H = XᵀX/N (the float model's calibration pass, `calib/stats.py`):
  ``tr(ΔW H ΔWᵀ)``, the mean squared error of its outputs per token (ΔW = W - Q_c(W) through the method);
* the output head: the same, with H of the final norm's output (its input);
* the token embeddings: the mean squared error of a looked-up row, ``‖ΔE‖²_F / vocab`` (every token equally
  likely: the calibration's token counts are not kept); a tied embedding also pays the head's cost.

Costs are estimated on `SAMPLE_ROWS` evenly spaced rows (rows are quantized independently, so the sample's error
times rows / sample is an unbiased estimate of the whole tensor's at a fraction of the time).

Options per tensor: every candidate whose blocks fit the tensor's rows, plus, for a candidate that does not fit,
the 32-element types llama.cpp falls back to (the tensor then takes one of those): the options a GGUF file can
really hold there. Bytes are exact (`outputs.OutputFormat.tensor_bytes`, GGUF: padded to the alignment).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qtool.plan import EMBED, HEAD

SAMPLE_ROWS = 256


@dataclass(frozen=True)
class Option:
    codec: str  # the concrete type written (a GGUF type name)
    bytes: int
    cost: float


def options_for(candidates: list[str], cols: int) -> list[str]:
    """The types tensor rows of `cols` elements can take for `candidates` (GGUF: the fallbacks of those that do not
    fit; other codecs: those whose groups divide the rows)."""
    from qtool.errors import IndivisibleError
    from qtool.formats.gguf_base import gguf_codec
    from qtool.formats.gguf_mixes import FALLBACK_CANDIDATES, fallback
    from qtool.formats.registry import codec, family

    out: list[str] = []
    for c in candidates:
        if family(c) != "gguf":
            try:
                codec(c).check_shape((1, cols))
                names = [c]
            except IndivisibleError:
                names = []
        elif cols % gguf_codec(c).block_size == 0:
            names = [c]
        else:
            fb = fallback(c, cols).type
            names = [t for t in FALLBACK_CANDIDATES.get(fb, (fb,)) if cols % gguf_codec(t).block_size == 0]
        out += [n for n in names if n not in out]
    return out


def sample_rows(w: torch.Tensor, n: int = SAMPLE_ROWS) -> torch.Tensor:
    from qtool.formats.base import evenly_spaced_rows

    return evenly_spaced_rows(w, n)


def quantize_as(w: torch.Tensor, t: str, method: str, hessian: torch.Tensor | None,
                scale_dtype: torch.dtype = torch.float32):
    """`w` through codec `t` (a registry name) and `method` (rtn | gptq), as a plan rule naming them would
    quantize it: the QTensor. `hessian`: the inputs' XᵀX/N (GPTQ's, and diag(H) the GGUF codecs' importance)."""
    from qtool.engine.run import quantize_weight
    from qtool.formats.registry import codec, rule_fields
    from qtool.plan import LayerSpec, Rule

    rule = Rule(match=".*", method=method, act_order=method == "gptq", **rule_fields(t))
    spec = LayerSpec("sensitivity", 0, method, codec(t, scale_dtype), rule=rule)
    h = None if hessian is None else hessian.float()
    imp = None if h is None else torch.diagonal(h).clamp_min(0)
    return quantize_weight(w.float(), spec, h, imp)[0]


def linear_costs(w: torch.Tensor, hessian: torch.Tensor, types: list[str], method: str = "rtn",
                 scale_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """{type: tr(ΔW H ΔWᵀ)} of weight `w` (out, in) through `method` (rtn | gptq), estimated on sampled rows."""
    ws = sample_rows(w.float())
    scale = w.shape[0] / ws.shape[0]
    h = hessian.float()
    out = {}
    for t in types:
        d = ws - quantize_as(ws, t, method, h, scale_dtype).dequantize()
        out[t] = float(((d @ h) * d).sum()) * scale
    return out


def embedding_costs(e: torch.Tensor, types: list[str]) -> dict[str, float]:
    """{type: ‖ΔE‖²_F / vocab}: the mean squared error of a looked-up row (unweighted fit, like llama.cpp's)."""
    from qtool.formats.gguf_base import gguf_codec

    es = sample_rows(e.float())
    return {t: float((es - gguf_codec(t).encode(es).dequantize()).square().sum()) / es.shape[0] for t in types}


def measure(source, stats, candidates: list[str], *, method: str = "rtn", fmt=None,
            scale_dtype: torch.dtype = torch.float32,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, list[Option]]:
    """{module name: options} for every decoder linear, and for GGUF the token embeddings and (untied) the
    output head (HF formats keep those float). `scale_dtype`: what int codecs store their scales in.

    `stats`: `calib.stats.Stats` of this model. Statistics written before the head's input was collected price
    the head like an embedding (its rows' squared error) and a tied embedding by its lookups only."""
    from qtool.io.arch import arch_of
    from qtool.outputs import output_format

    fmt = fmt or output_format("gguf")
    progress = progress or (lambda stage, done, total: None)
    cfg = source.config
    arch = arch_of(cfg)
    n = cfg.num_hidden_layers
    result: dict[str, list[Option]] = {}

    def options(name: str, shape: tuple[int, int], costs: dict[str, float]) -> list[Option]:
        from qtool.formats.registry import codec

        return [Option(t, fmt.tensor_bytes(codec(t, scale_dtype), shape, scale_dtype), c) for t, c in costs.items()]

    for i in range(n):
        for lin in arch.linears:
            name = arch.block_prefix(i) + lin
            w = source.get(name + ".weight")
            types = options_for(candidates, w.shape[1])
            if not types:
                from qtool.errors import UsageError

                raise UsageError(f"{name}: no candidate fits its rows of {w.shape[1]} (candidates: "
                                 f"{', '.join(candidates)}); add one whose groups divide {w.shape[1]}")
            result[name] = options(name, tuple(w.shape), linear_costs(w, stats.of(name).hessian, types, method,
                                                                      scale_dtype))
        progress("costs", i + 1, n + 1)
    if fmt.name != "gguf":  # HF formats keep the embeddings and the head in float
        return result
    from qtool.calib.stats import HEAD_INPUT

    head_h = stats.tensors[stats.inputs[HEAD_INPUT]].hessian if HEAD_INPUT in stats.inputs else None
    e = source.get(arch.embed)
    types = options_for(candidates, e.shape[1])
    costs = embedding_costs(e, types)
    if cfg.tie_word_embeddings and head_h is not None:  # the tied matrix is the head too
        head = linear_costs(e, head_h, types, "rtn")
        costs = {t: costs[t] + head[t] for t in types}
    result[EMBED] = options(EMBED, tuple(e.shape), costs)
    if not cfg.tie_word_embeddings and arch.lm_head in source.names():
        w = source.get(arch.lm_head)
        types = options_for(candidates, w.shape[1])
        costs = linear_costs(w, head_h, types, "rtn") if head_h is not None else embedding_costs(w, types)
        result[HEAD] = options(HEAD, tuple(w.shape), costs)
    progress("costs", n + 1, n + 1)
    return result
