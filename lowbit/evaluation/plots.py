"""Pictures of a quantization run, for the eye rather than the JSON."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

_BLOCK = re.compile(r"\.(\d+)\.(.+)$")


def plot_layer_errors(layers: list[dict], path: Path, title: str = "") -> Path | None:
    """Relative weight error (and output error, when recorded) per layer, one line per
    projection type across the depth of the model. Returns the path, or None if no layer
    has a weight error to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("weight_rel_error", "output_rel_error") if any(k in r for r in layers)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3.2 * len(keys)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in layers:
            m = _BLOCK.search(r["layer"])
            if m and key in r:
                series[m.group(2)].append((int(m.group(1)), r[key]))
        for kind, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=kind)
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("decoder block")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(history: list[dict], path: Path, title: str = "", final: dict | None = None, base_ppl: float | None = None) -> Path | None:
    """QAT's curves against training tokens: the training loss, and the protocol's
    perplexity and KL where they were measured (--eval-every, and the final model)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [h["tokens"] for h in history]
    steps = [h for h in history if "loss" in h]  # the step-0 row holds the PTQ start's evaluation only
    a1.plot([h["tokens"] for h in steps], [h["loss"] for h in steps], lw=1, label="loss")
    a1.plot([h["tokens"] for h in steps], [h["kl"] for h in steps], lw=1, alpha=0.6, label="KL to float (train)")
    a1.set_xlabel("training tokens")
    a1.set_ylabel("loss")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    pts = [(h["tokens"], h["eval"]) for h in history if "eval" in h]
    if final is not None:
        pts.append((tokens[-1], final))
    if pts:
        a2.plot([t for t, _ in pts], [e["ppl"] for _, e in pts], "o-", label="perplexity")
        if base_ppl:
            a2.axhline(base_ppl, color="gray", ls=":", label="float32")
        a2.set_xlabel("training tokens")
        a2.set_ylabel("perplexity (protocol)")
        b = a2.twinx()
        b.plot([t for t, _ in pts], [e["kl"] for _, e in pts], "s--", color="C1", label="KL")
        b.set_ylabel("KL (nats)")
        a2.legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
