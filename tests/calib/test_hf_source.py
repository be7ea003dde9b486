"""Calibration from a Hugging Face dataset (`hf:NAME[:CONFIG[:SPLIT]]`) through the `datasets` library.

The Hub is out of reach here, so NAME is a local dataset directory: `datasets.load_dataset` resolves Hub
ids and local directories through the same call, so this runs the code path a Hub name takes.
"""

import json

import pytest

pytest.importorskip("datasets")

from qtool.calib.data import calibration_tokens, read_text_source, source_digest  # noqa: E402
from qtool.errors import UsageError  # noqa: E402
from qtool.plan import Calibration  # noqa: E402

ROWS = [{"text": f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times.", "id": i}
        for i in range(200)]


@pytest.fixture
def local_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "test.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    return d


def test_hf_source_reads_the_text_column_in_order(local_dataset):
    text = read_text_source(f"hf:{local_dataset}")
    assert text == "\n\n".join(r["text"] for r in ROWS)
    assert read_text_source(f"hf:{local_dataset}::test") == "held out"
    spec = Calibration(source=f"hf:{local_dataset}")
    assert source_digest(spec) == source_digest(spec) and len(source_digest(spec)) == 64


def test_hf_source_feeds_calibration_windows(local_dataset, tiny_llama):
    from qtool.io.source import open_model

    src = open_model(tiny_llama)
    spec = Calibration(source=f"hf:{local_dataset}", samples=4, seq_len=32, seed=0)
    ids = calibration_tokens(src, spec, src.load_tokenizer())
    assert ids.shape == (4, 32)
    again = calibration_tokens(src, spec, src.load_tokenizer())
    assert (ids == again).all()


@pytest.mark.parametrize("source, message", [
    ("hf:", "expected hf:NAME[:CONFIG[:SPLIT]]"),
    ("hf:a:b:c:d", "expected hf:NAME[:CONFIG[:SPLIT]]"),
    ("hf:no-such-org/no-such-dataset-xyz", "datasets cannot load it"),
])
def test_bad_hf_sources_are_clear_errors(source, message, local_dataset):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_text_source(source)


def test_hf_split_that_does_not_exist(local_dataset):
    with pytest.raises(UsageError, match="datasets cannot load it"):
        read_text_source(f"hf:{local_dataset}::validation")
