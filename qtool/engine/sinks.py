"""Where the engine's results go: one sink per kind of artifact, behind one protocol.

The engine streams three things into a sink: float parameters (`add_float`), quantized tensors
(`add_quantized`, which returns what the file holds for it so the engine can report bytes and build run-time
modules), and at the end the run's manifest (`finish`), which writes the metadata the artifact carries and
renames it into place; `abort` removes everything. Sinks know their container; the engine knows neither.

* `HFSink`: a Hugging Face directory (`io/hf_writer.py`): packed tensors from the output format's `pack`,
  config.json with its `quantization_config`, the tokenizer files, the plan and the manifest.
* `GGUFSink`: one GGUF file (`io/gguf_writer.py`): GGUF names, llama.cpp hyperparameters and tokenizer keys,
  `general.file_type` naming the mix, and provenance keys (`qtool.*`, and llama.cpp's `quantize.imatrix.*`
  when an importance matrix was used).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from qtool.formats.base import QTensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


class HFSink:
    def __init__(self, out: Path, out_fmt, *, force: bool, inputs: tuple[Path, ...], dtype: torch.dtype):
        from qtool.io.hf_writer import HFWriter

        self.fmt, self.dtype = out_fmt, dtype
        self.writer = HFWriter(out, force=force, inputs=inputs)  # refuses an existing output or one that is an input

    def add_float(self, name: str, t: torch.Tensor) -> None:
        self.writer.add(name, t.to(self.dtype))

    def add_quantized(self, module: str, qt: QTensor, spec) -> tuple[dict[str, torch.Tensor], int]:
        packed = self.fmt.pack(qt, self.dtype, spec)
        for key, t in packed.items():
            self.writer.add(f"{module}.{key}", t)
        return packed, sum(t.numel() * t.element_size() for t in packed.values())

    def finish(self, *, source, plan, manifest, qconfig: dict) -> None:
        config = source.config.to_dict()
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config["quantization_config"] = qconfig
        warning = self.fmt.warning(config["quantization_config"])
        manifest.warnings += [warning] if warning else []
        self._copy_tokenizer(source)
        self.writer.add_file("qtool_plan.yaml", plan.to_yaml())
        manifest.total_bytes = self.writer.total_bytes
        body = manifest.to_json()
        body.pop("seconds"), body.pop("out")  # keep the artifact byte-identical across runs and paths
        self.writer.add_file("qtool_manifest.json", json.dumps(body, indent=2, sort_keys=True) + "\n")
        self.writer.finish(config)

    def abort(self) -> None:
        self.writer.abort()

    def _copy_tokenizer(self, source) -> None:
        src_dir = source.path if source.path.is_dir() else None
        if src_dir is None:
            source.save_tokenizer(self.writer.tmp)
            return
        for fname in TOKENIZER_FILES:
            if (src_dir / fname).is_file():
                self.writer.add_file(fname, (src_dir / fname).read_bytes())


class GGUFSink:
    def __init__(self, out: Path, *, source, arch, plan, force: bool, inputs: tuple[Path, ...], float_type: str):
        from qtool.io.gguf_model import check_supported, permuted, tensor_namer
        from qtool.io.gguf_writer import GGUFFileWriter

        cfg = source.config
        check_supported(cfg, arch)  # before any work
        self.float_type = float_type
        self.writer = GGUFFileWriter(out, arch_name=arch.gguf_arch, names=tensor_namer(arch, cfg.num_hidden_layers),
                                     permute=permuted(arch, cfg), force=force, inputs=inputs)
        self.arch, self.plan = arch, plan
        self.imatrix: dict | None = None  # set by the engine when an importance matrix was used

    def add_float(self, name: str, t: torch.Tensor) -> None:
        self.writer.add(name, t, float_type=self.float_type)

    def add_quantized(self, module: str, qt: QTensor, spec) -> tuple[dict[str, torch.Tensor], int]:
        return {}, self.writer.add(module + ".weight", qt)

    def finish(self, *, source, plan, manifest, qconfig: dict) -> None:
        write_gguf_metadata(self.writer.meta, source, self.arch, plan, imatrix=self.imatrix,
                            check_kld=None if manifest.check is None else manifest.check.kld)
        predicted = self.writer.predicted_size()  # what `qtool sensitivity` budgets with, checked on every file
        self.writer.finish()
        manifest.total_bytes = self.writer.out.stat().st_size  # the whole file: what a budget counts
        if manifest.total_bytes != predicted:
            manifest.warnings.append(f"internal: the GGUF size predicted from its layout ({predicted} bytes) differs "
                                     f"from the file written ({manifest.total_bytes} bytes); please report it")

    def abort(self) -> None:
        self.writer.abort()


def write_gguf_metadata(meta, source, arch, plan, *, imatrix: dict | None = None, check_kld: float | None = None) -> None:
    """Every key a qtool GGUF file holds: llama.cpp's hyperparameters and tokenizer, `general.file_type` naming
    the mix, provenance (`qtool.*`; `quantize.imatrix.*` when an importance matrix was used; `qtool.check_kld`
    when the self-check ran). Shared by the sink and the size prediction (`predict_gguf_bytes`)."""
    import gguf

    from qtool import __version__
    from qtool.formats.gguf_mixes import MIXES
    from qtool.io.gguf_model import write_hparams, write_tokenizer

    cfg = source.config
    write_hparams(meta, cfg, arch, name=_model_name(source))
    meta.add_file_type(MIXES[plan.gguf_type][0])
    meta.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(meta, source, int(cfg.vocab_size))
    meta.add_string("qtool.version", __version__)
    meta.add_string("qtool.plan_digest", plan.digest())
    meta.add_string("qtool.plan", plan.to_yaml())
    meta.add_string("qtool.mix", plan.gguf_type)
    if plan.needs_calibration:
        from qtool.calib.data import source_digest

        meta.add_string("qtool.calibration_digest", source_digest(plan.calibration))
    if imatrix:
        meta.add_string("quantize.imatrix.file", str(imatrix["file"]))
        meta.add_string("quantize.imatrix.dataset", str(imatrix["dataset"]))
        meta.add_int32("quantize.imatrix.entries_count", int(imatrix["entries"]))
        meta.add_int32("quantize.imatrix.chunks_count", int(imatrix["chunks"]))
    if check_kld is not None:
        meta.add_float32("qtool.check_kld", float(check_kld))


class GGUFSize(NamedTuple):
    fixed: int  # header + metadata + tensor infos (padded) + the float tensors' data (padded)
    float_data: int  # of which the float tensors' data
    bytes_of: Callable  # (codec, shape) -> a quantized tensor's bytes in the file (padded)


def predict_gguf_bytes(source, arch, plan, quantized: dict[str, tuple[int, int]], float_type: str,
                       *, check: bool = True) -> GGUFSize:
    """The GGUF file `plan` gives `source`: its size is exactly
    ``fixed + sum(bytes_of(codec, shape) for each quantized tensor)`` (each tensor padded to the alignment).

    `quantized`: module name -> weight shape of every tensor the plan quantizes (decoder linears, and
    `model.embed_tokens` / `lm_head` when quantized); every other tensor of the source is a float tensor the
    engine writes (norms F32, the rest `float_type`). `check`: the self-check's key is counted (a run with
    --no-check is 24 bytes smaller). An importance matrix file adds its `quantize.imatrix.*` keys (~150 bytes),
    not counted here: plans from `qtool sensitivity` carry their own calibration."""
    from qtool.io.gguf_model import permuted, tensor_namer
    from qtool.io.gguf_writer import GGUFFileWriter, _pad

    cfg = source.config
    w = GGUFFileWriter(None, arch_name=arch.gguf_arch, names=tensor_namer(arch, cfg.num_hidden_layers),
                       permute=permuted(arch, cfg))
    write_gguf_metadata(w.meta, source, arch, plan, check_kld=0.0 if check else None)
    q_weights = {m + ".weight" for m in quantized}
    tied = cfg.tie_word_embeddings
    written = [n for n in source.names() if n.startswith(arch.block_prefix(0).split("0")[0])]  # block parameters
    written += [arch.embed, arch.final_norm] + ([] if tied else [arch.lm_head])
    planned = [w.float_entry(n, tuple(source.shape(n)), float_type) for n in written
               if n not in q_weights and n in source.names()]
    planned += [(m + ".weight", [shape[0], 0], 0, 0) for m, shape in quantized.items()]  # infos only: data below
    fixed = w.predicted_size(planned)

    def bytes_of(codec, shape: tuple[int, int]) -> int:
        return _pad(codec.nbytes(shape))

    return GGUFSize(fixed, sum(_pad(e[3]) for e in planned), bytes_of)


def _model_name(source) -> str:
    name = getattr(source.config, "_name_or_path", "") or source.path.name
    return Path(str(name)).name.removesuffix(".gguf") or "model"
