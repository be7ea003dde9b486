"""Quant plans: the YAML schema, its validation, and rule resolution per module.

A plan is validated completely at the edge (before any model is loaded); an error names the file, the line
and the field and says what is allowed. Inside qtool a plan is a frozen `Plan`.

    rules:                       # ordered; the first rule whose `match` regex is found in a module name wins
      - match: 'mlp\\.down_proj'
        method: rtn              # rtn | gptq | awq | hqq, or a chain: [awq, gptq] (transforms first)
        codec: int               # int | nf4 | fp4
        bits: 8                  # int: 2, 3, 4, 8
        group_size: channel      # int: 32, 64, 128, 256 or channel
        symmetric: true
      - match: '.*'
        codec: int
        bits: 4
        group_size: 64
    ignore: ['layers\\.0\\.']    # regexes: modules kept in original precision
    on_indivisible: error        # error | fallback-per-channel | fallback-group-64
    output: {format: compressed-tensors, dtype: auto}
    check: {sequences: 4, seq_len: 128, warn_kld: 0.5}
    calibration: {source: generated, samples: 128, seq_len: 512, seed: 0, precision: bf16}  # gptq/awq/...

Only decoder-block linears are quantized; embeddings and lm_head keep original precision; norms too, except
that an AWQ transform folds its scales into the norm that feeds the scaled linears.
`symmetric` defaults to true, and to false when awq or hqq is in the chain (zero points are part of them).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qtool.calib.precision import DEFAULT as DEFAULT_PRECISION, PRECISIONS
from qtool.errors import IndivisibleError, PlanError
from qtool.formats.base import Codec
from qtool.outputs import OUTPUT_FORMATS, output_format

METHODS = ("rtn", "gptq", "awq", "hqq")  # weight methods: the last step of a rule
TRANSFORMS = ("awq", "smoothquant")  # float rewrites applied before the weight method (`method: [awq, gptq]`)
CALIBRATED = ("gptq", "awq", "smoothquant")
ACTIVATIONS = ("none", "int8")  # int8: dynamic per-token symmetric int8 inputs at run time (W8A8)
ASYMMETRIC_DEFAULT = ("awq", "hqq")  # methods whose rules default to `symmetric: false` (zero points)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k",
              "q5_k", "q6_k", "iq4_xs")  # ggml types qtool encodes (formats/gguf_*.py)
MIX = "mix"  # GGUF plans: the type llama.cpp's named mix (`output.type`) gives each tensor
CODECS = ("int", "nf4", "fp4") + GGUF_TYPES + (MIX,)
INT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ON_INDIVISIBLE = ("error", "fallback-per-channel", "fallback-group-64")
FORMATS = tuple(OUTPUT_FORMATS)  # one object per format: qtool/outputs/<format>.py
DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMAT_OF_CODEC = {"int": "compressed-tensors", "nf4": "bnb", "fp4": "bnb", **{t: "gguf" for t in GGUF_TYPES + (MIX,)}}
# what each output format holds (codecs, bits, symmetry, fp16 scales, g_idx ...): qtool/outputs/<format>.py
# modules outside the decoder blocks that GGUF plans quantize (rules may name them; HF formats keep them float)
EMBED, HEAD = "model.embed_tokens", "lm_head"


@dataclass(frozen=True)
class Rule:
    match: str
    method: str = "rtn"
    codec: str = "int"
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    symmetric: bool = True
    clip_search: bool = False
    block_size: int = 64  # nf4/fp4
    double_quant: bool = False  # nf4/fp4
    damp: float = 0.01  # gptq: fraction of mean(diag H) added to the diagonal
    act_order: bool | str = False  # gptq: visit columns by decreasing diag(H): true (static groups) or "dynamic"
    #                                (groups along that order + a g_idx; written as GPTQ desc_act, gptq formats only)
    static_groups: bool = False  # gptq: fit group parameters on the original weights
    transforms: tuple[str, ...] = ()  # applied in order before `method`, e.g. ("awq",)
    activations: str = "none"  # "int8": inputs quantized per token at run time (W8A8)
    outlier_threshold: float = 0.0  # LLM.int8(): input columns with any |x| above it stay float (0 = none)
    alpha: float = 0.5  # smoothquant: migration strength, s_j = max|x_j|^alpha / max|w_j|^(1-alpha)

    @property
    def steps(self) -> tuple[str, ...]:
        """The rule's method chain as written: transforms, then the weight method (`awq` alone is both)."""
        if self.transforms == ("awq",) and self.method == "awq":
            return ("awq",)
        return self.transforms + (self.method,)


@dataclass(frozen=True)
class Calibration:
    """Where calibration activations come from: a text/jsonl file path, or `generated` (sampled from the
    model itself, seeded: works offline). `precision`: of the calibration pass's matrix products, `bf16`
    (float32 in and out, inputs rounded to bfloat16 inside oneDNN's GEMMs: ~2.3x faster on AMX/AVX512-BF16
    CPUs) or `fp32` (IEEE, bit-exact to a float forward); see `calib/precision.py`."""

    source: str = "generated"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    precision: str = DEFAULT_PRECISION


@dataclass(frozen=True)
class LayerSpec:
    """What happens to one linear: the resolved rule, its codec, and any fallback that was applied."""

    name: str
    rule_index: int
    method: str
    codec: Codec
    note: str = ""
    rule: Rule | None = None
    candidates: tuple = ()  # GGUF shape fallback: codecs no larger than llama.cpp's; the least-error one is kept


@dataclass(frozen=True)
class Plan:
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    on_indivisible: str = "error"
    output_format: str = "compressed-tensors"
    gguf_type: str = "Q4_K_M"  # GGUF output: llama.cpp's named mix (`output.type`) that `codec: mix` follows
    dtype: str = "auto"
    check_sequences: int = 4
    check_seq_len: int = 128
    warn_kld: float = 0.5
    calibration: Calibration = Calibration()
    source: str = field(default="<flags>", compare=False)

    gguf_importance: bool = False  # GGUF plans with a `calibration:` section: codecs weight by its importance

    @property
    def needs_calibration(self) -> bool:
        return self.gguf_importance or any(step in CALIBRATED for r in self.rules for step in r.steps)

    def digest(self) -> str:
        """sha256 of the plan's content (not of where it came from): keys caches and resume data."""
        body = asdict(self)
        body.pop("source")
        if self.output_format != "gguf":
            body.pop("gguf_type"), body.pop("gguf_importance")  # digests of HF plans are unchanged by the GGUF field
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        rules = []
        for r in self.rules:
            d = asdict(r)
            d.pop("transforms")
            d["method"] = r.steps[0] if len(r.steps) == 1 else list(r.steps)
            d["group_size"] = "channel" if r.group_size == 0 else r.group_size
            if r.codec == "int":
                d.pop("block_size"), d.pop("double_quant")
            elif r.codec in GGUF_TYPES + (MIX,):
                d.pop("block_size"), d.pop("double_quant")
                d.pop("bits"), d.pop("group_size"), d.pop("symmetric"), d.pop("clip_search")
            else:
                d.pop("bits"), d.pop("group_size"), d.pop("symmetric"), d.pop("clip_search")
            if r.method != "gptq":
                d.pop("damp"), d.pop("act_order"), d.pop("static_groups")
            if r.activations == "none":
                d.pop("activations"), d.pop("outlier_threshold")
            elif r.outlier_threshold == 0:
                d.pop("outlier_threshold")
            if "smoothquant" not in r.transforms:
                d.pop("alpha")
            rules.append(d)
        body = {
            "rules": rules,
            "ignore": list(self.ignore),
            "on_indivisible": self.on_indivisible,
            "output": {"format": self.output_format, "dtype": self.dtype,
                       **({"type": self.gguf_type} if self.output_format == "gguf" else {})},
            "check": {"sequences": self.check_sequences, "seq_len": self.check_seq_len, "warn_kld": self.warn_kld},
        }
        if self.needs_calibration:
            body["calibration"] = asdict(self.calibration)
        return yaml.safe_dump(body, sort_keys=False)

    def resolve(self, shapes: dict[str, tuple[int, int]], dtype=None, mix: dict | None = None) -> dict[str, LayerSpec]:
        """One LayerSpec per quantized linear (module name -> spec); ignored/unmatched modules are absent.

        `shapes` maps module names (no `.weight`) to weight shapes (out, in); `dtype` is the artifact's float
        dtype, which scales are stored in (loaders dequantize in the model dtype; GPTQ/AWQ files hold fp16).
        Indivisible group sizes are handled as `on_indivisible` says; `error` raises IndivisibleError naming the layer and widths.
        `mix` (GGUF plans): module name -> `formats.gguf_mixes.TypeChoice`, the types `codec: mix` follows.
        A GGUF type that does not fit a tensor's rows takes llama.cpp's fallback and records the candidates
        no larger than it (`LayerSpec.candidates`): the engine keeps the one with the least error.
        """
        if output_format(self.output_format).fp16_scales:
            import torch

            dtype = torch.float16  # these formats store fp16 scales: fit on the grid the file holds
        specs: dict[str, LayerSpec] = {}
        for name in sorted(shapes):
            if any(re.search(p, name) for p in self.ignore):
                continue
            for i, rule in enumerate(self.rules):
                if re.search(rule.match, name):
                    if rule.codec in GGUF_TYPES + (MIX,):
                        specs[name] = _gguf_spec(name, i, rule, shapes[name], (mix or {}).get(name))
                    else:
                        specs[name] = self._spec(name, i, rule, shapes[name], dtype)
                    break
        return specs

    def _spec(self, name: str, index: int, rule: Rule, shape: tuple[int, int], dtype) -> LayerSpec:
        codec = make_codec(rule, dtype)
        try:
            codec.check_shape(shape)
            return LayerSpec(name, index, rule.method, codec, rule=rule)
        except IndivisibleError as e:
            if self.on_indivisible == "error":
                raise IndivisibleError(
                    f"{name}: {e} (set `on_indivisible: fallback-per-channel` or `fallback-group-64` in the plan)"
                ) from None
            gs = 0 if self.on_indivisible == "fallback-per-channel" else 64
            fallback = make_codec(replace(rule, group_size=gs), dtype)
            try:
                fallback.check_shape(shape)
            except IndivisibleError:
                fallback = make_codec(replace(rule, group_size=0), dtype)
            return LayerSpec(name, index, rule.method, fallback, note=f"{codec.name} -> {fallback.name}: {e}", rule=rule)


def _gguf_spec(name: str, index: int, rule: Rule, shape: tuple[int, int], choice) -> LayerSpec:
    """A GGUF tensor's spec: the rule's type (or the mix's), with llama.cpp's shape fallback when its rows do not
    fit the type's blocks; then the 32-block types no larger than that fallback are the candidates."""
    from qtool.formats.gguf_base import gguf_codec
    from qtool.formats.gguf_mixes import FALLBACK_CANDIDATES, fallback

    if rule.codec == MIX:
        if choice is None:
            raise PlanError(f"{name}: `codec: mix` needs GGUF output (`output: {{format: gguf, type: Q4_K_M}}`)")
        wanted = choice.wanted or choice.type
    else:
        wanted = rule.codec
    fb = fallback(wanted, shape[-1])
    method = rule.method if name not in (EMBED, HEAD) else "rtn"  # no Hessian for the embedding / the head here
    note = "" if method == rule.method else f"{rule.method} -> rtn (embedding/head)"
    if fb.wanted is None:
        return LayerSpec(name, index, method, gguf_codec(fb.type), note=note, rule=rule)
    cands = tuple(gguf_codec(t) for t in FALLBACK_CANDIDATES.get(fb.type, (fb.type,)) if shape[-1] % 32 == 0)
    return LayerSpec(name, index, method, gguf_codec(fb.type), note="; ".join(filter(None, [note, fb.reason])),
                     rule=rule, candidates=cands)


def make_codec(rule: Rule, dtype=None) -> Codec:
    """The codec object a rule names; int scales are stored in `dtype` (a torch float dtype; default float32)."""
    if rule.codec == "int":
        import torch

        from qtool.formats.affine import AffineCodec

        extra = {"float_zero": True} if rule.method == "hqq" else {}  # HQQ optimises a float zero point
        return AffineCodec(bits=rule.bits, group_size=rule.group_size, symmetric=rule.symmetric,
                           scale_dtype=dtype or torch.float32, clip_search=rule.clip_search, **extra)
    from qtool.formats.nf4 import NF4Codec

    return NF4Codec(kind=rule.codec, block_size=rule.block_size, double_quant=rule.double_quant)


# ----------------------------------------------------------------------------------------------- YAML edge


class _Node:
    """A YAML node with its location, for error messages that name file, line and field."""

    def __init__(self, node: yaml.Node, path: str, where: str):
        self.node, self.path, self.where = node, path, where

    def error(self, msg: str) -> PlanError:
        line = self.node.start_mark.line + 1
        return PlanError(f"{self.where}:{line}: {self.path}: {msg}")

    def mapping(self, allowed: tuple[str, ...]) -> dict[str, "_Node"]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error("expected a mapping (key: value)")
        out = {}
        for k, v in self.node.value:
            key = k.value
            child = _Node(v, f"{self.path}.{key}" if self.path else key, self.where)
            if key not in allowed:
                raise _Node(k, child.path, self.where).error(f"unknown field; allowed: {', '.join(allowed)}")
            if key in out:
                raise _Node(k, child.path, self.where).error("field given twice")
            out[key] = child
        return out

    def sequence(self) -> list["_Node"]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error("expected a list")
        return [_Node(v, f"{self.path}[{i}]", self.where) for i, v in enumerate(self.node.value)]

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error("expected a single value")
        return yaml.safe_load(yaml.serialize(self.node))

    def choice(self, allowed: tuple) -> Any:
        v = self.scalar()
        if v not in allowed:
            raise self.error(f"{v!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return v

    def boolean(self) -> bool:
        v = self.scalar()
        if not isinstance(v, bool):
            raise self.error(f"{v!r} is not true/false")
        return v

    def number(self, kind: type, lo: float, hi: float) -> Any:
        v = self.scalar()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise self.error(f"{v!r} is not {'an integer' if kind is int else 'a number'}")
        if not lo <= v <= hi:
            raise self.error(f"{v} is out of range; allowed: {lo}..{hi}")
        return kind(v)

    def regex(self) -> str:
        v = self.scalar()
        if not isinstance(v, str):
            raise self.error(f"{v!r} is not a regex string")
        try:
            re.compile(v)
        except re.error as e:
            raise self.error(f"invalid regex {v!r}: {e}") from None
        return v


RULE_FIELDS = ("match", "method", "codec", "bits", "group_size", "symmetric", "clip_search", "block_size",
               "double_quant", "damp", "act_order", "static_groups", "activations", "outlier_threshold", "alpha")
GPTQ_FIELDS = ("damp", "act_order", "static_groups")


def _method_chain(n: _Node) -> dict[str, Any]:
    """`method: gptq` | `method: awq` | `method: [awq, gptq]` (transforms first, one weight method last)."""
    if isinstance(n.node, yaml.SequenceNode):
        items = n.sequence()
        if not items:
            raise n.error("an empty method list; e.g. [awq, gptq]")
        *transforms, last = items
        chain = tuple(t.choice(TRANSFORMS) for t in transforms)
        if len(set(chain)) != len(chain):
            raise n.error("a transform is listed twice")
        return {"method": last.choice(METHODS), "transforms": chain}
    method = n.choice(METHODS + tuple(t for t in TRANSFORMS if t not in METHODS))
    if method not in METHODS:  # a transform alone
        raise n.error(f"{method} is a transform: follow it with a weight method, e.g. [{method}, rtn]")
    return {"method": method, "transforms": ("awq",) if method == "awq" else ()}


def _rule(n: _Node) -> Rule:
    f = n.mapping(RULE_FIELDS)
    if "match" not in f:
        raise n.error("a rule needs `match` (a regex on module names, e.g. '.*' or 'mlp\\.down_proj')")
    kw: dict[str, Any] = {"match": f["match"].regex()}
    if "method" in f:
        kw.update(_method_chain(f["method"]))
    codec = kw["codec"] = f["codec"].choice(CODECS) if "codec" in f else "int"
    int_only, nf_only = ("bits", "group_size", "symmetric", "clip_search"), ("block_size", "double_quant")
    gguf_codec = codec in GGUF_TYPES + (MIX,)
    for key in (int_only + nf_only if gguf_codec else int_only if codec != "int" else nf_only):
        if key in f:
            raise f[key].error(f"does not apply to codec {codec!r}")
    if "bits" in f:
        kw["bits"] = f["bits"].choice(INT_BITS)
    if "group_size" in f:
        g = f["group_size"].scalar()
        kw["group_size"] = 0 if g in ("channel", -1) else f["group_size"].choice(GROUP_SIZES + ("channel",))
    if kw.get("method", "rtn") not in (("rtn", "gptq", "awq") if gguf_codec else ("rtn",)) and codec != "int":
        raise f["method"].error(f"{kw['method']} quantizes through int codecs{' (and gptq/awq through GGUF types)' if gguf_codec else ''}; "
                                f"codec {codec!r} is not supported")
    if any(t != "awq" or not gguf_codec for t in kw.get("transforms", ())) and codec != "int":
        raise f["method"].error(f"{kw['transforms'][0]} scaling is searched on int grids{' (awq on GGUF types too)' if gguf_codec else ''}; "
                                f"codec {codec!r} is not supported")
    for key in GPTQ_FIELDS:
        if key in f and kw.get("method") != "gptq":
            raise f[key].error("applies only to method gptq")
    if "damp" in f:
        kw["damp"] = f["damp"].number(float, 0.0, 1.0)
    for key in ("symmetric", "clip_search", "double_quant", "static_groups"):
        if key in f:
            kw[key] = f[key].boolean()
    if "act_order" in f:
        v = f["act_order"].scalar()
        if not (isinstance(v, bool) or v == "dynamic"):
            raise f["act_order"].error(f"{v!r} is not allowed; allowed: true (static groups), false, dynamic "
                                       "(groups along the act-order, written with a g_idx)")
        kw["act_order"] = v
        if v == "dynamic" and kw.get("static_groups"):
            raise f["static_groups"].error("contradicts `act_order: dynamic` (its groups follow the act-order); "
                                           "for static groups write `act_order: true`")
    if "block_size" in f:
        kw["block_size"] = f["block_size"].choice(BLOCK_SIZES)
    if "activations" in f:
        kw["activations"] = f["activations"].choice(ACTIVATIONS)
        if kw["activations"] != "none" and codec != "int":
            raise f["activations"].error(f"int8 activations run against int weights; codec {codec!r} is not supported")
    if "outlier_threshold" in f:
        kw["outlier_threshold"] = f["outlier_threshold"].number(float, 0.0, 1e6)
        if kw.get("activations", "none") == "none" and kw["outlier_threshold"] > 0:
            raise f["outlier_threshold"].error("keeps outlier input columns out of int8 activations: "
                                               "it needs `activations: int8`")
    if "alpha" in f:
        if "smoothquant" not in kw.get("transforms", ()):
            raise f["alpha"].error("applies only to the smoothquant transform, e.g. `method: [smoothquant, rtn]`")
        kw["alpha"] = f["alpha"].number(float, 0.0, 1.0)
    if kw.get("method") == "hqq" and kw.get("group_size") == 0:
        raise f["group_size"].error("hqq's float zero points are written per group (compressed-tensors blocks); "
                                    "allowed: 32, 64, 128, 256")
    if kw.get("method") == "hqq" and kw.get("symmetric"):
        raise f["symmetric"].error("hqq optimises a (float) zero point: it is asymmetric; drop `symmetric: true`")
    steps = (*kw.get("transforms", ()), kw.get("method", "rtn"))
    if codec == "int" and "symmetric" not in f and any(step in ASYMMETRIC_DEFAULT for step in steps):
        kw["symmetric"] = False
    return Rule(**kw)


def parse_plan(text: str, where: str = "<plan>") -> Plan:
    """Validate a plan's YAML text; errors name `where`, the line and the field."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PlanError(f"{where}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        raise PlanError(f"{where}: the plan is empty; it needs at least `rules:`")
    top = _Node(root, "", where).mapping(
        ("version", "name", "description", "rules", "ignore", "on_indivisible", "output", "check", "calibration"))
    if "version" in top:
        top["version"].choice((1,))
    if "rules" not in top:
        raise PlanError(f"{where}: the plan has no `rules:` list")
    rule_nodes = top["rules"].sequence()
    rules = tuple(_rule(r) for r in rule_nodes)
    if not rules:
        raise top["rules"].error("needs at least one rule")
    kw: dict[str, Any] = {"rules": rules, "source": where}
    if "ignore" in top:
        kw["ignore"] = tuple(n.regex() for n in top["ignore"].sequence())
    if "on_indivisible" in top:
        kw["on_indivisible"] = top["on_indivisible"].choice(ON_INDIVISIBLE)
    # LLM.int8 (outlier columns) is a bitsandbytes layout; everything else follows its codec
    formats = {"bnb" if r.outlier_threshold > 0 else FORMAT_OF_CODEC[r.codec] for r in rules}
    if "output" in top:
        out = top["output"].mapping(("format", "dtype", "type"))
        if "type" in out:
            from qtool.formats.gguf_mixes import MIXES

            kw["gguf_type"] = out["type"].choice(tuple(MIXES))
        if "format" in out:
            kw["output_format"] = out["format"].choice(FORMATS)
        if "dtype" in out:
            kw["dtype"] = out["dtype"].choice(DTYPES)
        if "type" in out and kw.get("output_format", formats and next(iter(formats))) != "gguf":
            raise out["type"].error("names a GGUF mix (Q4_K_M, ...): it applies to `format: gguf` only")
    explicit = "output_format" in kw
    if not explicit:
        if len(formats) > 1:
            raise top["rules"].error("rules mix compressed-tensors (int codecs) with bitsandbytes (nf4/fp4, or "
                                     "int8 with an outlier_threshold); one artifact holds one format")
        kw["output_format"] = formats.pop()
    fmt = output_format(kw["output_format"])
    for node, r in zip(rule_nodes, rules):  # what the format holds is written once: qtool/outputs/<format>.py
        why = fmt.refuse(r)
        if why is None:
            continue
        field, msg = why
        if field == "act_order":
            raise node.mapping(RULE_FIELDS)["act_order"].error(msg)
        raise (top["output"].mapping(("format", "dtype", "type"))["format"] if explicit else top["rules"]).error(msg)
    if "check" in top:
        chk = top["check"].mapping(("sequences", "seq_len", "warn_kld"))
        if "sequences" in chk:
            kw["check_sequences"] = chk["sequences"].number(int, 0, 64)
        if "seq_len" in chk:
            kw["check_seq_len"] = chk["seq_len"].number(int, 8, 4096)
        if "warn_kld" in chk:
            kw["warn_kld"] = chk["warn_kld"].number(float, 0.0, 100.0)
    if "calibration" in top:
        cal = top["calibration"].mapping(("source", "samples", "seq_len", "seed", "precision"))
        ckw: dict[str, Any] = {}
        if "source" in cal:
            v = cal["source"].scalar()
            if not isinstance(v, str) or not v:
                raise cal["source"].error("expected a file path or `generated`")
            ckw["source"] = v
        if "samples" in cal:
            ckw["samples"] = cal["samples"].number(int, 1, 100_000)
        if "seq_len" in cal:
            ckw["seq_len"] = cal["seq_len"].number(int, 8, 32768)
        if "seed" in cal:
            ckw["seed"] = cal["seed"].number(int, 0, 2**31 - 1)
        if "precision" in cal:
            ckw["precision"] = cal["precision"].choice(PRECISIONS)
        kw["calibration"] = Calibration(**ckw)
        if kw["output_format"] == "gguf":
            kw["gguf_importance"] = True  # GGUF: the calibration text gives every codec its importance (imatrix)
    return Plan(**kw)


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"{p}: plan file not found")
    return parse_plan(p.read_text(), where=str(p))
