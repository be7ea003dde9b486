"""Codecs by name (`formats/registry.py`): every spelling gives the codec whose `.name` it is, and the plan-rule
fields that resolve to that same codec."""

import pytest
import torch

from qtool.errors import UsageError
from qtool.formats.registry import codec, family, rule_fields
from qtool.plan import parse_plan

NAMES = ["q4_k", "iq4_nl", "q8_0", "int4_g64_asym", "int3_g128_sym", "int8_ch_sym", "int2_g32_asym", "nf4_b64_dq",
         "fp4_b128"]


@pytest.mark.parametrize("name", NAMES)
def test_name_round_trips_through_codec_and_plan(name):
    assert codec(name).name == name
    f = rule_fields(name)
    body = ", ".join(f"{k}: {('channel' if k == 'group_size' and v == 0 else str(v).lower())}" for k, v in f.items())
    fmt = {"gguf": "gguf", "int": "compressed-tensors", "bnb": "bnb"}[family(name)]
    plan = parse_plan(f"rules:\n  - {{match: '.*', {body}}}\noutput: {{format: {fmt}}}\n")
    assert plan.resolve({"m": (64, 256)}, torch.float32)["m"].codec.name == name


@pytest.mark.parametrize("bad", ["int5_g64_asym", "int4_g48_sym", "q9_k", "nf4", "int4_g64"])
def test_unknown_names_list_the_spellings(bad):
    with pytest.raises(UsageError, match="int4_g64_asym, int8_ch_sym"):
        rule_fields(bad)
