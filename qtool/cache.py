"""qtool's on-disk cache root: derived data only (base log-probs, generated text, GGUF-derived config and
tokenizer), safe to delete. $QTOOL_CACHE_DIR, else $XDG_CACHE_HOME/qtool, else ~/.cache/qtool."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("QTOOL_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtool"
    return Path(root).expanduser()
