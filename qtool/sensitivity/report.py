"""`qtool sensitivity --report DIR`: the pictures a person reads at a glance (matplotlib, PNG).

* `costs.png`: a heatmap per candidate type of every decoder linear's predicted cost (layers x tensor kinds,
  log scale, one colour scale for all panels), and a last panel with the type the plan picked.
* `frontier.png`: predicted cost against file size for planned mixes at budgets across the feasible range
  (the solver's frontier), the written plan marked, and llama.cpp's named mixes priced by the same costs
  (their per-tensor rules and fallbacks) as points: a named mix above the frontier wastes bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _grid(values: dict[str, float], n_layers: int):
    import numpy as np

    g = np.full((n_layers, len(KINDS)), np.nan)
    for name, v in values.items():
        m = re.match(r"model\.layers\.(\d+)\..*\.(\w+_proj)$", name)
        if m and m.group(2) in KINDS:
            g[int(m.group(1)), KINDS.index(m.group(2))] = v
    return g


def cost_heatmap(path: Path, options: dict, picks: dict[str, str], n_layers: int, candidates: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm

    types = [t for t in candidates if any(o.codec == t for opts in options.values() for o in opts)]
    types += sorted({o.codec for opts in options.values() for o in opts} - set(types))
    grids = [_grid({n: o.cost for n, opts in options.items() for o in opts if o.codec == t}, n_layers) for t in types]
    finite = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
    norm = LogNorm(vmin=max(finite.min(), finite.max() * 1e-8), vmax=finite.max()) if finite.size else None
    fig, axes = plt.subplots(1, len(types) + 1, figsize=(2.2 * (len(types) + 1) + 1.5, 0.22 * n_layers + 2.2),
                             sharey=True)
    for ax, t, g in zip(axes, types, grids):
        im = ax.imshow(np.where(g > 0, g, np.nan), aspect="auto", cmap="viridis", norm=norm)
        ax.set_title(t.upper(), fontsize=9)
        ax.set_xticks(range(len(KINDS)), [k.removesuffix("_proj") for k in KINDS], rotation=90, fontsize=7)
    axes[0].set_ylabel("layer")
    step = max(1, n_layers // 16)
    axes[0].set_yticks(range(0, n_layers, step))
    order = sorted({t for t in picks.values()}, key=lambda t: types.index(t) if t in types else 99)
    pg = _grid({n: order.index(t) for n, t in picks.items()}, n_layers)
    cmap = ListedColormap([plt.get_cmap("tab10")(i) for i in range(len(order))])
    im2 = axes[-1].imshow(pg, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5)
    axes[-1].set_title("picked", fontsize=9)
    axes[-1].set_xticks(range(len(KINDS)), [k.removesuffix("_proj") for k in KINDS], rotation=90, fontsize=7)
    cb = fig.colorbar(im2, ax=axes[-1], ticks=range(len(order)))
    cb.ax.set_yticklabels([t.upper() for t in order], fontsize=7)
    if norm is not None:
        fig.colorbar(im, ax=list(axes[:-1]), label="predicted cost (output error, log)")
    fig.suptitle("qtool sensitivity: cost of each tensor at each type (alone), and the types picked", fontsize=10,
                 y=1.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def frontier_plot(path: Path, frontier: list[tuple[int, float]], chosen: tuple[int, float],
                  named: dict[str, tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, ys = zip(*sorted(frontier))
    ax.plot([x / 1e6 for x in xs], ys, "o-", color="tab:blue", label="qtool planned mixes")
    ax.plot([chosen[0] / 1e6], [chosen[1]], "*", ms=16, color="tab:red", label="this plan")
    for name, (b, c) in sorted(named.items()):
        ax.plot([b / 1e6], [c], "s", color="tab:gray")
        ax.annotate(f"llama.cpp {name}", (b / 1e6, c), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("predicted cost (sum over tensors)")
    ax.set_title("size vs predicted cost: planned mixes and llama.cpp's named mixes", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
