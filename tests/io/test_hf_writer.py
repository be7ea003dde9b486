"""The atomic HF writer: shards + index that transformers and qtool read back, nothing left on abort."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qtool.errors import UsageError
from qtool.io.hf_writer import HFWriter
from qtool.io.source import open_model


def test_sharded_output_round_trips_through_transformers_and_qtool(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    sd = load_file(tiny_llama / "model.safetensors")
    out = tmp_path / "sharded"
    w = HFWriter(out, max_shard_bytes=400_000)
    for name in sorted(sd):
        w.add(name, sd[name])
    assert not out.exists()  # nothing visible before finish
    w.finish(json.loads((tiny_llama / "config.json").read_text()))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    src = open_model(out)
    assert all(torch.equal(src.get(n), sd[n]) for n in sd)
    a = AutoModelForCausalLM.from_pretrained(out)
    b = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert oct(next(out.glob("*.safetensors")).stat().st_mode & 0o777) == "0o644"


def test_abort_leaves_nothing_and_duplicate_names_are_refused(tmp_path):
    out = tmp_path / "o"
    w = HFWriter(out)
    w.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="written twice"):
        w.add("a", torch.zeros(3))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_an_input_is_refused(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for out in (model, tmp_path):
        with pytest.raises(UsageError, match="would overwrite the input"):
            HFWriter(out, force=True, inputs=(model,))
    assert model.is_dir()
