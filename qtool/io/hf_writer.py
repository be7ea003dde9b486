"""Writes a Hugging Face model directory atomically and deterministically.

Tensors stream in block by block; they are flushed to safetensors shards of at most `max_shard_bytes`, so
memory holds one shard, not the model. Everything goes to a temporary sibling directory that is renamed
into place by `finish()` only when complete; `abort()` (or an exception) removes it. No timestamps, fixed
ordering: the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qtool.errors import UsageError


def prepare_output(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an existing output unless `force`, and any output that is or holds an input (checked first)."""
    target = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise UsageError(f"{out}: the output would overwrite the input {p}; choose another --out")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: parent directory does not exist")


class HFWriter:
    def __init__(self, out: Path, force: bool = False, max_shard_bytes: int = 512 << 20,
                 inputs: tuple[Path, ...] = ()):
        prepare_output(out, force, inputs)
        self.out, self.force, self.max_shard_bytes = out, force, max_shard_bytes
        self.tmp = out.parent / f".{out.name}.qtool-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        t = t.detach().contiguous()
        self._pending[name] = t
        n = t.numel() * t.element_size()
        self._pending_bytes += n
        self.total_bytes += n
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def add_file(self, name: str, data: bytes | str) -> None:
        (self.tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def _flush(self) -> None:
        if not self._pending:
            return
        k = len(self._shards)
        shard = self.tmp / f"shard-{k}.safetensors"
        save_file(self._pending, str(shard), metadata={"format": "pt"})
        shard.chmod(0o644)  # safetensors creates 0600 files; artifacts are meant to be shared
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, config: dict) -> Path:
        """Write config.json (+ index when sharded), then atomically move the directory into place."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.tmp / "shard-0.safetensors", self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for k, names in enumerate(self._shards):
                fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp / f"shard-{k}.safetensors", self.tmp / fname)
                weight_map.update({name: fname for name in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        self.add_file("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.qtool-old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
