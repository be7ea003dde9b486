"""Plan validation: every shipped plan loads; bad plans name file, line and field."""

from pathlib import Path

import pytest

from qtool.errors import IndivisibleError, PlanError
from qtool.plan import load_plan, parse_plan

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_plan_loads(path):
    plan = load_plan(path)
    assert plan.rules
    assert len(plan.digest()) == 64
    # the YAML a plan prints parses back to the same plan
    assert parse_plan(plan.to_yaml()).digest() == plan.digest()


def test_shipped_plans_cover_the_foundation_set():
    names = {p.name for p in CONFIGS}
    assert {"int8.yaml", "w4a16-g128.yaml", "w4a16-g64.yaml", "nf4.yaml", "mixed-example.yaml"} <= names


GOOD = """\
rules:
  - match: '.*'
    codec: int
    bits: 4
    group_size: 64
"""


GPTQ = GOOD.replace("codec: int", "codec: int\n    method: gptq")


@pytest.mark.parametrize(
    "text, line, needle",
    [
        (GOOD.replace("codec: int", "codec: int\n    method: magic"), 4, "rules[0].method: 'magic' is not allowed; allowed: rtn"),
        (GOOD.replace("bits: 4", "bits: 16"), 4, "rules[0].bits: 16 is not allowed; allowed: 2, 3, 4, 8"),
        (GOOD.replace("group_size: 64", "group_size: 100"), 5, "rules[0].group_size: 100 is not allowed"),
        (GOOD.replace("codec: int", "codec: int9"), 3, "rules[0].codec: 'int9' is not allowed"),
        (GOOD + "colour: blue\n", 6, "colour: unknown field"),
        (GOOD.replace("match: '.*'", "match: '(unclosed'"), 2, "invalid regex"),
        (GOOD.replace("codec: int", "codec: nf4"), 4, "rules[0].bits: does not apply to codec 'nf4'"),
        (GOOD + "on_indivisible: pad\n", 6, "on_indivisible: 'pad' is not allowed"),
        (GOOD + "output: {format: bnb}\n", 6, "output.format: 'bnb' holds int codes of 8 bits"),
        ("rules: []\n", 1, "rules: needs at least one rule"),
        (GOOD + "    activations: int4\n", 6, "rules[0].activations: 'int4' is not allowed; allowed: none, int8"),
        (GOOD + "    outlier_threshold: 6.0\n", 6, "rules[0].outlier_threshold: keeps outlier input columns"),
        (GOOD + "    alpha: 0.5\n", 6, "rules[0].alpha: applies only to the smoothquant transform"),
        (GOOD.replace("codec: int", "codec: int\n    method: smoothquant"), 4,
         "rules[0].method: smoothquant is a transform: follow it with a weight method"),
        (GOOD + "    activations: int8\noutput: {format: gptq}\n", 7, "output.format: 'gptq' has no activation scheme"),
        (GOOD.replace("bits: 4", "bits: 8").replace("group_size: 64", "group_size: channel")
         + "    activations: int8\n    outlier_threshold: 6.0\noutput: {format: compressed-tensors}\n", 8,
         "'compressed-tensors' cannot hold an outlier threshold"),
        (GOOD + "    activations: int8\n    outlier_threshold: 6.0\n", 2, "rules: 'bnb' holds int codes of 8 bits; a rule asks for 4"),
        (GOOD.replace("bits: 4", "bits: 8") + "    activations: int8\noutput: {format: bnb}\n", 7,
         "bitsandbytes int8 (LLM.int8) holds 8-bit symmetric per-channel weights"),
        (GOOD.replace("codec: int", "codec: int\n    method: [smoothquant, rtn]") + "    alpha: 1.5\n", 7,
         "rules[0].alpha: 1.5 is out of range"),
        (GOOD + "    damp: 0.1\n", 6, "rules[0].damp: applies only to method gptq"),
        (GOOD.replace("codec: int", "codec: nf4\n    method: gptq").replace("    bits: 4\n    group_size: 64\n", ""),
         4, "gptq quantizes through int codecs"),
        (GOOD + "calibration: {samples: 0}\n", 6, "calibration.samples: 0 is out of range"),
        ("rules:\n  - codec: int\n", 2, "rules[0]: a rule needs `match`"),
        (GPTQ + "    act_order: maybe\n", 7,
         "rules[0].act_order: 'maybe' is not allowed; allowed: true (static groups), false, dynamic"),
        (GPTQ + "    act_order: dynamic\n", 7,
         "rules[0].act_order: dynamic act-order groups are written with a g_idx, which output format 'compressed-tensors'"),
        (GPTQ + "    act_order: dynamic\n" + "output: {format: awq}\n", 7, "output format 'awq' cannot hold"),
        (GPTQ + "    act_order: dynamic\n    static_groups: true\n" + "output: {format: gptq_v2}\n", 8,
         "rules[0].static_groups: contradicts `act_order: dynamic`"),
    ],
)
def test_bad_plans_name_file_line_and_field(tmp_path, text, line, needle):
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    with pytest.raises(PlanError) as e:
        load_plan(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert needle in msg, msg


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("rules: [\n")
    with pytest.raises(PlanError, match=r"p\.yaml:\d+: not valid YAML"):
        load_plan(p)
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "nope.yaml")


def test_mixing_formats_is_refused():
    text = "rules:\n  - {match: 'mlp', codec: nf4}\n  - {match: '.*', codec: int}\n"
    with pytest.raises(PlanError, match="one artifact holds one format"):
        parse_plan(text)


SHAPES = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536),
          "model.layers.1.self_attn.q_proj": (576, 576)}


def test_resolve_first_rule_wins_and_ignore():
    plan = parse_plan("rules:\n  - {match: 'down_proj', bits: 8, group_size: channel}\n"
                      "  - {match: '.*', bits: 4, group_size: 64}\nignore: ['layers\\.1\\.']\n")
    specs = plan.resolve(SHAPES)
    assert set(specs) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert specs["model.layers.0.mlp.down_proj"].codec.name.startswith("int8")
    assert specs["model.layers.0.self_attn.q_proj"].codec.name.startswith("int4_g64")


def test_indivisible_group_size_is_an_error_naming_layer_and_widths():
    plan = parse_plan("rules:\n  - {match: '.*', bits: 4, group_size: 128}\n")
    with pytest.raises(IndivisibleError) as e:
        plan.resolve(SHAPES)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg or "model.layers.0.self_attn.q_proj" in msg
    assert "576" in msg and "128" in msg and "on_indivisible" in msg


@pytest.mark.parametrize("mode, expect", [("fallback-per-channel", "int4_ch"), ("fallback-group-64", "int4_g64")])
def test_indivisible_fallbacks(mode, expect):
    plan = parse_plan(f"rules:\n  - {{match: '.*', bits: 4, group_size: 128}}\non_indivisible: {mode}\n")
    specs = plan.resolve(SHAPES)
    q = specs["model.layers.0.self_attn.q_proj"]
    assert q.codec.name.startswith(expect) and "576" in q.note
    # 1536 is a multiple of 128: no fallback there
    assert specs["model.layers.0.mlp.down_proj"].codec.name.startswith("int4_g128")
    assert specs["model.layers.0.mlp.down_proj"].note == ""


def test_digest_ignores_where_the_plan_came_from(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text(GOOD)
    assert load_plan(p).digest() == parse_plan(GOOD).digest()
    assert parse_plan(GOOD.replace("bits: 4", "bits: 8")).digest() != parse_plan(GOOD).digest()


def test_gptq_plan_round_trips_with_calibration():
    text = GOOD.replace("codec: int", "codec: int\n    method: gptq\n    act_order: true\n    damp: 0.05") + \
        "calibration: {source: data.txt, samples: 16, seq_len: 64, seed: 3}\n"
    plan = parse_plan(text)
    assert plan.needs_calibration and plan.calibration.samples == 16 and plan.rules[0].damp == 0.05
    again = parse_plan(plan.to_yaml())
    assert again.digest() == plan.digest() and again.calibration == plan.calibration


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_act_order_dynamic_round_trips_and_true_stays_static(fmt):
    """`act_order: true` alone keeps meaning static groups (shipped configs rely on it); `dynamic` is its own
    value, printed back as written, with its own digest."""
    static = parse_plan(GPTQ + "    act_order: true\n" + f"output: {{format: {fmt}}}\n")
    dynamic = parse_plan(GPTQ + "    act_order: dynamic\n" + f"output: {{format: {fmt}}}\n")
    assert static.rules[0].act_order is True and static.rules[0].static_groups is False
    assert dynamic.rules[0].act_order == "dynamic" and dynamic.digest() != static.digest()
    assert "act_order: dynamic" in dynamic.to_yaml() and "act_order: true" in static.to_yaml()
    for plan in (static, dynamic):
        again = parse_plan(plan.to_yaml())
        assert again.digest() == plan.digest() and again.rules == plan.rules
    from qtool.methods import gptq

    spec = dynamic.resolve({"model.layers.0.mlp.down_proj": (64, 256)})["model.layers.0.mlp.down_proj"]
    assert gptq.params_of(spec).act_order == "dynamic"
