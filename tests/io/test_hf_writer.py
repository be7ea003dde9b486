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


def test_shards_are_byte_identical_to_safetensors_save_file(tmp_path):
    """The spill-file writer reproduces save_file's layout exactly, for every dtype qtool writes."""
    import torch
    from safetensors.torch import save_file

    from qtool.io.hf_writer import HFWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"w.packed": torch.randint(-2**31, 2**31 - 1, (7, 3), generator=g, dtype=torch.int32),
               "w.scale": torch.randn(7, 2, generator=g).half(), "w.bf": torch.randn(5, generator=g).bfloat16(),
               "w.shape": torch.tensor([7, 24]), "empty": torch.zeros(0, 4), "codes": torch.arange(-5, 5, dtype=torch.int8),
               "nf4": torch.arange(9, dtype=torch.uint8), "a.f32": torch.randn(3, 3, generator=g),
               "scalar": torch.tensor(3.5, dtype=torch.float64), "flag": torch.tensor([True, False]),
               "noncontig": torch.randn(4, 6, generator=g).T}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    w = HFWriter(tmp_path / "out")
    for k, v in tensors.items():
        w.add(k, v)
    w.finish({"model_type": "llama"})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not list((tmp_path / "out").glob("*.spill"))
