"""The README's Makefile recipe runs as written (on the tiny model): it passes a good run and stops a bad one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK_TEXT = ROOT / "qtool" / "data" / "check.txt"


def _recipe() -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- makefile-recipe -->\n```make\n(.*?)```\n<!-- /makefile-recipe -->", readme, re.S)
    assert m, "README lost its makefile-recipe block"
    return m.group(1)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_readme_makefile_recipe(tiny_llama, tmp_path):
    (tmp_path / "Makefile").write_text(_recipe())

    def make(max_kld: str, out: str) -> subprocess.CompletedProcess:
        args = ["make", "-f", str(tmp_path / "Makefile"), f"MODEL={tiny_llama}", "METHOD=rtn", f"OUT={tmp_path / out}",
                f"MAX_KLD={max_kld}", f"EVAL=--text {CHECK_TEXT} --ctx 64 --chunks 4", f"QTOOL={sys.executable} -m qtool"]
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    good = make("5", "good")
    assert good.returncode == 0, good.stdout + good.stderr
    assert (tmp_path / "good.quantize.json").is_file() and (tmp_path / "good.eval.json").is_file()
    assert (tmp_path / "good" / "config.json").is_file()
    again = make("5", "good")  # up to date: nothing reruns
    assert again.returncode == 0 and "quantize" not in again.stdout

    bad = make("0.00001", "bad")
    assert bad.returncode != 0
    assert "quality gate failed" in bad.stderr
    assert not (tmp_path / "bad.quantize.json").exists() and not (tmp_path / "bad.eval.json").exists()
    assert (tmp_path / "bad" / "config.json").is_file()  # the artifact is kept for inspection
