"""The native kernel loader: builds into the cache atomically, reports why a kernel cannot be had."""

import pytest

from qtool.runtime import native


def test_build_failures_are_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="building broken.cpp failed"):
        native.build("broken", sources=tmp_path, cache=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="is not installed"):
        native.build("absent", sources=tmp_path, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C.. compiler found"):
        native.build("broken", sources=tmp_path, cache=tmp_path / "cache")
