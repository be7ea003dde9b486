r"""Flags -> Plan: the common cases without a YAML file, through the same validated Plan a file gives.

`plan_from_flags` turns `--method/--bits/--group-size/...` into the plan's YAML text and parses it with
`plan.parse_plan`, so a flag plan and its YAML twin are the same object (same digest, same artifact), and
`--print-plan` prints exactly that text. Combinations that make no sense fail first, in flag terms, on one
line naming both flags and what is allowed.

Method presets (each shown in `qtool quantize --help` and in the run summary):

| --method | what | bits | group | symmetric | calibration |
|---|---|---|---|---|---|
| rtn | round to nearest, int codec | 4 | 128 | asym | none |
| int8 | int8 per output channel (W8A16) | 8 | channel | sym | none |
| nf4 / fp4 | bitsandbytes 4-bit, block 64, double quant | 4 | block 64 | - | none |
| gptq | GPTQ, act-order (static groups), damp 0.01 | 4 | 128 | asym | generated |
| awq | AWQ scales + clip search | 4 | 128 | asym | generated |
| awq-gptq | AWQ scales, then GPTQ | 4 | 128 | asym | generated |
| hqq | half-quadratic zero/scale, no data | 4 | 64 | asym (float zero) | none |
| smoothquant | SmoothQuant α 0.5, int8 weights + per-token int8 activations (W8A8) | 8 | channel | sym | generated |
| llm-int8 | LLM.int8(): W8A8, input columns with \|x\| > 6.0 kept in float (bitsandbytes) | 8 | channel | sym | none |

The default group size (128; 64 for hqq) is lowered for the whole model to the largest of 128/64/32 that
divides every quantized layer's input width (SmolLM2's 576 gives 64): one scheme per artifact, so every
output format can hold it. An explicit `--group-size` that does not divide a width is an error naming it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import yaml

from qtool.errors import UsageError
from qtool.outputs import HF_FORMATS
from qtool.plan import CALIBRATED as plan_calibrated
from qtool.plan import GROUP_SIZES, Plan, Rule, parse_plan

PRESETS: dict[str, dict] = {
    "rtn": {"method": "rtn", "codec": "int", "bits": 4, "group_size": 128, "symmetric": False},
    "int8": {"method": "rtn", "codec": "int", "bits": 8, "group_size": "channel", "symmetric": True},
    "nf4": {"method": "rtn", "codec": "nf4", "block_size": 64, "double_quant": True},
    "fp4": {"method": "rtn", "codec": "fp4", "block_size": 64, "double_quant": True},
    "gptq": {"method": "gptq", "codec": "int", "bits": 4, "group_size": 128, "symmetric": False, "act_order": True,
             "damp": 0.01},
    "awq": {"method": "awq", "codec": "int", "bits": 4, "group_size": 128, "symmetric": False},
    "awq-gptq": {"method": ["awq", "gptq"], "codec": "int", "bits": 4, "group_size": 128, "symmetric": False,
                 "act_order": True, "damp": 0.01},
    "hqq": {"method": "hqq", "codec": "int", "bits": 4, "group_size": 64, "symmetric": False},
    "smoothquant": {"method": ["smoothquant", "rtn"], "codec": "int", "bits": 8, "group_size": "channel",
                    "symmetric": True, "activations": "int8", "alpha": 0.5},
    "llm-int8": {"method": "rtn", "codec": "int", "bits": 8, "group_size": "channel", "symmetric": True,
                 "activations": "int8", "outlier_threshold": 6.0},
}
METHOD_NAMES = tuple(PRESETS)
FORMAT_NAMES = HF_FORMATS  # compressed-tensors, gptq, gptq_v2, awq, bnb (qtool/outputs)
CALIBRATED = ("gptq", "awq", "awq-gptq", "smoothquant")
FLAG_OF_FIELD = {"bits": "--bits", "group_size": "--group-size", "symmetric": "--asym"}
FIXED_BITS = ("int8", "llm-int8", "smoothquant", "nf4", "fp4")  # methods whose bit width is the method


def _rule(preset: dict, f: "Flags | None" = None) -> Rule:
    """The plan rule a preset (with `f`'s --bits/--group-size/--sym applied) stands for."""
    kw = {k: v for k, v in preset.items() if k in Rule.__dataclass_fields__}
    chain = preset["method"] if isinstance(preset["method"], list) else [preset["method"]]
    kw["method"] = chain[-1]
    kw["transforms"] = tuple(chain[:-1]) + (("awq",) if chain[-1] == "awq" else ())
    for key, value in (("bits", f and f.bits), ("symmetric", f and f.symmetric),
                       ("group_size", f and f.group_size and _group(f.group_size))):
        if value is not None and kw.get("codec", "int") == "int":
            kw[key] = value
    if kw.get("group_size") == "channel":
        kw["group_size"] = 0
    return Rule(match=".*", **kw)


def formats_of(method: str) -> tuple[str, ...]:
    """The HF output formats that can hold `method`'s codes with some --bits/--group-size/--sym the method takes
    (the rule those flags give is checked in full); 8-bit methods keep their bits."""
    from qtool.outputs import output_format

    free = {k for k in FLAG_OF_FIELD if not (k == "bits" and method in FIXED_BITS)}
    return tuple(n for n in FORMAT_NAMES
                 if all(field in free for field, _ in output_format(n).refusals(_rule(PRESETS[method]))))


@dataclass(frozen=True)
class Flags:
    """The plan-shaping flags of `quantize`; None = not given."""

    method: str | None = None
    bits: int | None = None
    group_size: str | None = None  # "32".."256" or "channel"
    symmetric: bool | None = None
    ignore: tuple[str, ...] = ()
    format: str | None = None
    calib: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    precision: str | None = None

    def given(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, ())}


@dataclass
class FlagPlan:
    plan: Plan
    yaml_text: str
    notes: list[str] = field(default_factory=list)  # what defaults were taken / what flags overrode


def _group(value: str) -> int | str:
    if value == "channel":
        return "channel"
    try:
        g = int(value)
    except ValueError:
        g = None
    if g not in GROUP_SIZES:
        raise UsageError(f"--group-size {value}: not a group size; allowed: {', '.join(map(str, GROUP_SIZES))} or channel")
    return g


def _check_combination(f: Flags) -> None:
    m = f.method
    if m in ("nf4", "fp4"):
        if f.bits not in (None, 4):
            raise UsageError(f"--bits {f.bits} does not apply to --method {m} (always 4-bit); drop --bits")
        if f.group_size is not None:
            raise UsageError(f"--group-size does not apply to --method {m} (bitsandbytes blocks of 64); drop it")
        if f.symmetric is not None:
            raise UsageError(f"--sym/--asym do not apply to --method {m} (a fixed 4-bit code book); drop it")
    if m == "int8" and f.bits not in (None, 8):
        raise UsageError(f"--bits {f.bits} with --method int8: int8 is 8-bit; use --method rtn --bits {f.bits}")
    if m == "llm-int8" and (f.bits not in (None, 8) or f.group_size not in (None, "channel") or f.symmetric is False):
        raise UsageError("--bits/--group-size/--asym with --method llm-int8: LLM.int8 (bitsandbytes) is 8-bit "
                         "symmetric per channel; drop them")
    if m == "smoothquant" and f.symmetric is False:
        raise UsageError("--asym with --method smoothquant: W8A8 int kernels take symmetric weights; drop --asym")
    if m == "hqq" and f.symmetric:
        raise UsageError("--sym with --method hqq: HQQ optimises a float zero point (asymmetric); drop --sym")
    if f.format is not None and m is not None:  # what a format holds is written once: qtool/outputs/<format>.py
        from qtool.outputs import output_format

        allowed = formats_of(m)
        if f.format not in allowed:
            raise UsageError(f"--format {f.format} cannot hold --method {m}; allowed: {', '.join(allowed)}")
        why = output_format(f.format).refuse(_rule(PRESETS[m], f))
        # a v1 GPTQ file takes symmetric codes: without --asym the flags switch to --sym (plan_from_flags)
        if why is not None and (why[0] != "symmetric" or f.symmetric is False):
            given = {"bits": f.bits, "group_size": f.group_size, "symmetric": f.symmetric}.get(why[0])
            flag = "" if given is None else (f" {FLAG_OF_FIELD[why[0]]}" if why[0] == "symmetric"
                                             else f" {FLAG_OF_FIELD[why[0]]} {given}")
            raise UsageError(f"--format {f.format} with --method {m}{flag}: {why[1]}"
                             + ("" if given is not None or why[0] not in FLAG_OF_FIELD
                                else f" (set {FLAG_OF_FIELD[why[0]]})"))
    if f.calib is not None and m is not None and m not in CALIBRATED:
        raise UsageError(f"--calib with --method {m}: {m} uses no calibration data; "
                         f"methods that do: {', '.join(CALIBRATED)}")


def auto_group_size(preferred: int, widths: list[int]) -> int:
    """The largest of `preferred`, 64, 32 that divides every width (per channel when none does)."""
    for g in (preferred, 64, 32):
        if g <= preferred and all(w % g == 0 for w in widths):
            return g
    return 0


def plan_from_flags(f: Flags, widths: list[int] | None = None, base: Plan | None = None) -> FlagPlan:
    """Build the Plan that `f` describes (on top of `base`, a plan from --plan, when given).

    `widths`: the input widths of the model's linears, for the default group size (see module doc).
    """
    if f.group_size is not None:
        _group(f.group_size)
    if f.bits is not None and f.bits not in (2, 3, 4, 8):
        raise UsageError(f"--bits {f.bits}: allowed 2, 3, 4, 8")
    if base is None and f.method is None:
        raise UsageError("give --method (e.g. --method awq) or --plan FILE")
    _check_combination(f)
    notes: list[str] = []
    if base is None:
        rule = dict(PRESETS[f.method])
        rule_list = [{"match": ".*", **rule}]
        body: dict = {"rules": rule_list}
        if "group_size" in rule and f.group_size is None and rule["group_size"] != "channel" and widths:
            g = auto_group_size(rule["group_size"], widths)
            if g != rule["group_size"]:
                notes.append(f"default group size {rule['group_size']} does not divide every layer width "
                             f"({', '.join(map(str, sorted(set(w for w in widths if w % rule['group_size']))))}): "
                             f"using {g or 'channel'} for the whole model")
                rule["group_size"] = g or "channel"
                rule_list[0] = {"match": ".*", **rule}
        notes.append(f"--method {f.method} defaults: " + ", ".join(f"{k} {v}" for k, v in rule.items() if k != "method"))
    else:
        body = yaml.safe_load(base.to_yaml())
        body.pop("calibration", None)
        if base.needs_calibration:
            body["calibration"] = asdict(base.calibration)
        rule_list = body["rules"]
        if f.method is not None:
            preset = PRESETS[f.method]
            for r in rule_list:
                r["method"] = preset["method"]
                for k in ("act_order", "damp", "activations", "outlier_threshold", "alpha"):
                    if k in preset and k not in r:
                        r[k] = preset[k]
            notes.append(f"--method {f.method} overrides the plan's methods ({len(rule_list)} rules)")
    for key, flag, value in (("bits", "--bits", f.bits), ("symmetric", "--sym/--asym", f.symmetric),
                             ("group_size", "--group-size", None if f.group_size is None else _group(f.group_size))):
        if value is None:
            continue
        for r in rule_list:
            if r.get("codec", "int") == "int":
                if base is not None and r.get(key) != value:
                    notes.append(f"{flag} overrides rule '{r['match']}': {key} {r.get(key)} -> {value}")
                r[key] = value
    if f.ignore:
        body["ignore"] = list(body.get("ignore", [])) + list(f.ignore)
    if f.format is not None:
        body.setdefault("output", {})["format"] = f.format
        if f.format == "gptq" and f.symmetric is None and any(r.get("symmetric") is False for r in rule_list):
            for r in rule_list:
                r["symmetric"] = True
            notes.append("--format gptq (v1) holds symmetric codes only: using --sym (--format gptq_v2 keeps asym)")
    chain = [s for r in rule_list for s in (r["method"] if isinstance(r["method"], list) else [r["method"]])]
    calibrated = any(s in plan_calibrated for s in chain)
    if calibrated:
        cal = dict(body.get("calibration") or {"source": "generated", "samples": 128, "seq_len": 512, "seed": 0})
        for key, value in (("source", f.calib), ("samples", f.samples), ("seq_len", f.seq_len), ("seed", f.seed),
                           ("precision", f.precision)):
            if value is not None:
                if base is not None and cal.get(key) != value:
                    notes.append(f"--{key.replace('_', '-') if key != 'source' else 'calib'} overrides the plan's "
                                 f"calibration {key}: {cal.get(key)} -> {value}")
                cal[key] = value
        body["calibration"] = cal
        if cal["source"] == "generated":
            notes.append("no calibration text given: sampling it from the model itself (seeded, offline); "
                         "pass --calib FILE to use real text")
    elif f.calib is not None or f.samples is not None or f.seq_len is not None or f.precision is not None:
        raise UsageError("--calib/--samples/--seq-len/--precision apply to calibrated methods (gptq, awq); "
                         "this plan uses none")
    text = yaml.safe_dump(body, sort_keys=False)
    plan = parse_plan(text, where="<flags>")
    return FlagPlan(plan, plan.to_yaml(), notes)


GGUF_METHODS = ("rtn", "gptq", "awq", "awq-gptq")  # methods that round through GGUF block grids


def gguf_plan_from_flags(mix: str, method: str | None, f: Flags, base: Plan | None = None,
                         importance: bool = False) -> FlagPlan:
    """The GGUF plan of `qtool convert-gguf` (and `quantize --format gguf`): llama.cpp's mix `mix` for every
    tensor (`codec: mix`), through `method`; `importance`: collect an imatrix from the calibration text (RTN)."""
    from qtool.formats.gguf_mixes import MIXES

    key = mix.upper()
    if key not in MIXES:
        raise UsageError(f"--type {mix}: unknown GGUF type; known: {', '.join(MIXES)}")
    if method is not None and method not in GGUF_METHODS:
        raise UsageError(f"--method {method} cannot write GGUF in this version; allowed: {', '.join(GGUF_METHODS)}")
    notes: list[str] = []
    chain = {"awq-gptq": ["awq", "gptq"]}.get(method or "rtn", method or "rtn")
    if base is not None:
        body = yaml.safe_load(base.to_yaml())
        if method is not None:
            for r in body["rules"]:
                r["method"] = chain
            notes.append(f"--method {method} overrides the plan's methods")
    else:
        rule = {"match": ".*", "method": chain, "codec": "mix"}
        if method in ("gptq", "awq-gptq"):  # act-order over blocks fitted on the original weights (static): measured best
            rule["act_order"] = True
        body = {"rules": [rule]}
    body.setdefault("output", {}).update({"format": "gguf", "type": key})
    calibrated = importance or method in CALIBRATED or any(r.get("method") == "gptq" for r in body["rules"]) or (
        base and base.needs_calibration)
    if calibrated:
        cal = dict(body.get("calibration") or {"source": "generated", "samples": 128, "seq_len": 512, "seed": 0})
        for k, value in (("source", f.calib), ("samples", f.samples), ("seq_len", f.seq_len), ("seed", f.seed),
                         ("precision", f.precision)):
            if value is not None:
                cal[k] = value
        body["calibration"] = cal
        if cal["source"] == "generated":
            notes.append("no calibration text given: sampling it from the model itself (seeded, offline); "
                         "pass --calib FILE to use real text")
    plan = parse_plan(yaml.safe_dump(body, sort_keys=False), where="<flags>")
    return FlagPlan(plan, plan.to_yaml(), notes)
