"""How well `qtool sensitivity`'s costs predict the truth (SmolLM2-135M, after `make bench-sensitivity`).

Single-tensor changes: a seeded sample of decoder linears, each quantized alone (RTN, the importance the costs
use) to two of its options (the smallest and the median by size); the true final-logit KL against the float
model on held-out text (WikiText-2, 4 x 512 tokens) next to the predicted cost of both modes; Spearman rank
correlation per option and over all pairs. Measured costs are read from the bench's JSON report (`--json` of
`qtool sensitivity --mode measured`); proxy costs are computed here.

    python bench/sensitivity_fidelity.py --bases off-grid        # results: bench/results/sensitivity_fidelity.json
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_gguf import base_parser  # noqa: E402
from bench_sensitivity import CANDIDATES  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--mix", default="Q4_K_M", help="the bench run whose measured costs are read")
    args = ap.parse_args()
    from qtool.calib import stats as st
    from qtool.formats.registry import codec
    from qtool.io.source import open_model
    from qtool.runtime.load import load_model
    from qtool.sensitivity.costs import measure as proxy

    out = {"rows": []}
    for base in args.bases.split(","):
        work = args.work / base
        rep = json.loads((work / f"sens-rtn-measured-{args.mix}.json").read_text())
        measured = {n: {o["codec"]: o["cost"] for o in opts} for n, opts in rep["options"].items()}
        src = open_model(str(work / "f32.gguf"))
        stats = st.load(work / "stats")
        names = sorted(n for n in measured if n.startswith("model.layers."))
        sample = random.Random(0).sample(names, min(args.tensors, len(names)))
        px = proxy(src, stats, CANDIDATES.split(","))
        model = load_model(work / "f32.gguf")[0].eval()
        tok = src.load_tokenizer()
        text = (args.data / "wikitext2-test.txt").read_text()[:200_000]
        ids = torch.tensor(tok(text)["input_ids"][: 4 * 512]).reshape(4, 512)
        with torch.no_grad():
            base_lp = torch.cat([torch.log_softmax(model(ids[i:i + 1]).logits.double(), -1) for i in range(4)])
        for name in sample:
            mod = model.get_submodule(name)
            w = mod.weight.detach().clone()
            opts = sorted(measured[name], key=lambda t: (codec(t).nbytes(tuple(w.shape)), t))
            imp = torch.diagonal(stats.of(name).hessian).float()
            for t in {opts[0], opts[(len(opts) - 1) // 2]}:
                with torch.no_grad():
                    mod.weight.copy_(codec(t).encode(w, imp).dequantize())
                    lq = torch.cat([torch.log_softmax(model(ids[i:i + 1]).logits.double(), -1) for i in range(4)])
                    mod.weight.copy_(w)
                kl = float((base_lp.exp() * (base_lp - lq)).sum(-1).mean())
                row = {"base": base, "tensor": name, "type": t, "true_kl": kl, "measured": measured[name][t],
                       "proxy": next(o.cost for o in px[name] if o.codec == t)}
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
        rows = [r for r in out["rows"] if r["base"] == base]
        truth = [r["true_kl"] for r in rows]
        out[base] = {"pairs": len(rows),
                     "spearman_measured": spearman([r["measured"] for r in rows], truth),
                     "spearman_proxy": spearman([r["proxy"] for r in rows], truth),
                     "median_ratio_measured": sorted(r["measured"] / r["true_kl"] for r in rows)[len(rows) // 2]}
        print(json.dumps(out[base]), flush=True)
    (args.out / "sensitivity_fidelity.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
