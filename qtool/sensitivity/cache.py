"""Cached costs: a second budget on the same model, statistics and candidates costs seconds, not a measurement.

Entries are JSON files under `~/.cache/qtool/sensitivity/` (or --cache DIR), named by the sha256 of everything the
costs depend on (model and statistics digests, candidates, method, mode, token budget, output format, scale
dtype, and `COST_VERSION`, bumped whenever the cost algorithms change). JSON only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qtool.sensitivity.costs import Option

COST_VERSION = 1
DEFAULT = Path.home() / ".cache" / "qtool" / "sensitivity"


def key(**parts) -> str:
    return hashlib.sha256(json.dumps({"v": COST_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def load(directory: Path, k: str) -> tuple[dict[str, list[Option]], dict | None] | None:
    p = Path(directory) / f"{k}.json"
    if not p.is_file():
        return None
    try:
        body = json.loads(p.read_text())
        options = {n: [Option(o["codec"], int(o["bytes"]), float(o["cost"])) for o in opts]
                   for n, opts in body["options"].items()}
        details = body.get("details")
        if details and "block_sensitivity" in details:  # JSON keys are strings
            details = {**details, "block_sensitivity": {int(j): v for j, v in details["block_sensitivity"].items()},
                       "probe_size": {int(j): v for j, v in details["probe_size"].items()}}
        return options, details
    except (ValueError, KeyError, TypeError):
        return None  # a damaged entry is measured again (and overwritten)


def save(directory: Path, k: str, options: dict[str, list[Option]], details: dict | None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    body = {"options": {n: [{"codec": o.codec, "bytes": o.bytes, "cost": o.cost} for o in opts]
                        for n, opts in options.items()}, "details": details}
    tmp = d / f".{k}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, d / f"{k}.json")
