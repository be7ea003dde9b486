"""The self-check: a float and a quantized activation stream carried through every block on a few
held-out sequences; at the end, final-logit KL divergence and same-top % against the base."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch


@dataclass
class CheckReport:
    kld: float
    same_top_pct: float
    block_rel_err: list[float]
    sequences: int
    seq_len: int
    warn_kld: float

    @property
    def ok(self) -> bool:
        return self.kld <= self.warn_kld


def check_tokens(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """`n` held-out sequences of `seq_len` tokens from qtool's built-in check text (deterministic)."""
    text = resources.files("qtool").joinpath("data/check.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    need = n * seq_len
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    return ids[:need].view(n, seq_len)


def logit_kld(hf: torch.Tensor, hq: torch.Tensor, head: torch.Tensor,
              head_q: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean KL(base || quantized) and same-top % of final logits, one sequence at a time (bounded memory).
    `head_q`: the quantized model's output head when it differs from the base's (GGUF quantizes it)."""
    head_q = head if head_q is None else head_q
    kld_sum, same, n = 0.0, 0, 0
    # 16 positions at a time: the float64 log-probs of a 49k vocabulary stay ~6 MB per tensor
    for a, b in zip(hf.reshape(-1, hf.shape[-1]).split(16), hq.reshape(-1, hq.shape[-1]).split(16)):
        lp = torch.log_softmax((a @ head.T).double(), -1)
        lq = torch.log_softmax((b @ head_q.T).double(), -1)
        kld_sum += (lp.exp() * (lp - lq)).sum().item()
        same += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        n += lp.shape[0]
    return kld_sum / n, 100.0 * same / n
