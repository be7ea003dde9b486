"""The quality gate of `quantize` and `eval`: thresholds on KL divergence and same-top %, for CI."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Gate:
    max_kld: float | None = None
    min_same_top: float | None = None  # percent

    @property
    def active(self) -> bool:
        return self.max_kld is not None or self.min_same_top is not None

    def failures(self, kld: float, same_top_pct: float) -> list[str]:
        """Why the measured numbers fail this gate (empty list: they pass)."""
        out = []
        if self.max_kld is not None and not kld <= self.max_kld:  # NaN fails
            out.append(f"KL divergence {kld:.5f} > --max-kld {self.max_kld:g}")
        if self.min_same_top is not None and not same_top_pct >= self.min_same_top:
            out.append(f"same-top {same_top_pct:.2f} % < --min-same-top {self.min_same_top:g}")
        return out

    def to_json(self, kld: float, same_top_pct: float) -> dict:
        fails = self.failures(kld, same_top_pct)
        return {**asdict(self), "kld": kld, "same_top_pct": same_top_pct, "passed": not fails, "failures": fails}
