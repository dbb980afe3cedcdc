"""Where the activation outliers are: per Linear input (inside the decoder blocks), per
input channel, the largest |x| seen and how often |x| exceeds a threshold (6.0: LLM.int8()'s
outlier threshold), over a set of windows. This is what decides how hard a layer's
activations are to quantize per tensor (one scale for every channel) and which methods
help (SmoothQuant and AWQ rescale channels, LLM.int8() keeps outlier columns in float).

    report = activation_report(model, windows)         # JSON-able dict
    save_activation_report(report, "report_dir")        # activations.json + activations.png
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from ..cache import atomic_path
from ..errors import LowbitError
from ..models.arch import block_linears, decoder_layers

_BLOCK = re.compile(r"\.(\d+)\.(.+)$")


class ChannelStats:
    """Running per-channel max |x| and count of |x| > threshold of one layer's input."""

    def __init__(self, width: int, threshold: float):
        self.threshold = threshold
        self.max_abs = torch.zeros(width, dtype=torch.float64)
        self.over = torch.zeros(width, dtype=torch.int64)
        self.tokens = 0
        self.finite = True

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs().float()
        if not bool(torch.isfinite(a).all()):
            self.finite = False
            a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
        self.max_abs = torch.maximum(self.max_abs, a.amax(0).double())
        self.over += (a > self.threshold).sum(0)
        self.tokens += a.shape[0]


@torch.no_grad()
def collect_activation_stats(model, windows: torch.Tensor, threshold: float = 6.0, progress: Callable | None = None) -> dict[str, ChannelStats]:
    """Run ``model`` on ``windows`` [n, seq] one window at a time with a pre-forward hook on
    every Linear of its decoder blocks; {full layer name: ChannelStats}."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise LowbitError(f"the activation report needs windows [n, seq_len], got shape {tuple(windows.shape)}")
    prefix, blocks = decoder_layers(model)
    stats: dict[str, ChannelStats] = {}
    handles = []
    for i, block in enumerate(blocks):
        for local, mod in block_linears(block).items():
            name = f"{prefix}.{i}.{local}"
            stats[name] = ChannelStats(mod.in_features, threshold)
            handles.append(mod.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0])))
    if not stats:
        raise LowbitError(f"{type(model).__name__} has no Linear layers in its decoder blocks to report on")
    model.eval()
    try:
        rows = range(windows.shape[0])
        for i in progress(rows) if progress else rows:
            model(input_ids=windows[i : i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    bad = [n for n, s in stats.items() if not s.finite]
    if bad:
        raise LowbitError(f"layer {bad[0]}: its inputs have NaN/inf values")
    return stats


def activation_report(model, windows: torch.Tensor, threshold: float = 6.0, progress: Callable | None = None) -> dict:
    """Per layer: max |x|, the median over channels of the channels' max |x| and the ratio
    of the two (what one per-tensor scale pays), elements with |x| > threshold, the
    channels that ever exceed it (their ids, largest first) and every channel's max |x|."""
    stats = collect_activation_stats(model, windows, threshold, progress)
    layers = []
    for name, s in stats.items():
        m = s.max_abs
        med = float(m.median())
        over_channels = torch.nonzero(s.over > 0).flatten()
        order = over_channels[torch.argsort(m[over_channels], descending=True)]
        layers.append({
            "layer": name,
            "in_features": int(m.numel()),
            "tokens": s.tokens,
            "max_abs": float(m.max()),
            "median_channel_max_abs": med,
            "max_to_median": float(m.max()) / med if med > 0 else None,
            "outliers": int(s.over.sum()),
            "outlier_fraction": float(s.over.sum()) / max(s.tokens * m.numel(), 1),
            "outlier_channels": int(over_channels.numel()),
            "outlier_channel_ids": order.tolist(),
            "channel_max_abs": [round(float(v), 5) for v in m],
        })
    worst = max(layers, key=lambda r: r["max_abs"]) if layers else None
    return {
        "threshold": threshold,
        "windows": list(windows.shape),
        "layers": layers,
        "summary": {
            "n_layers": len(layers),
            "layers_with_outliers": sum(r["outlier_channels"] > 0 for r in layers),
            "outlier_channels_total": sum(r["outlier_channels"] for r in layers),
            "max_abs": worst["max_abs"] if worst else None,
            "max_abs_layer": worst["layer"] if worst else None,
        },
    }


def plot_activation_report(report: dict, path: Path, title: str = "") -> Path | None:
    """Three panels: max |x| per layer and the number of outlier channels per layer across
    the depth (one line per projection), and a heat map of per-channel max |x| (blocks x
    channels) for the projection whose inputs have the most outlier channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    series: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for r in report["layers"]:
        m = _BLOCK.search(r["layer"])
        if m:
            series[m.group(2)].append((int(m.group(1)), r))
    if not series:
        return None
    fig, axes = plt.subplots(3, 1, figsize=(10, 10.5))
    for kind, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["max_abs"] for p in pts], marker=".", label=kind)
        axes[1].plot(xs, [p[1]["outlier_channels"] for p in pts], marker=".", label=kind)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max |x| of the input")
    axes[1].set_ylabel(f"channels with |x| > {report['threshold']:g}")
    for ax in axes[:2]:
        ax.set_xlabel("decoder block")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    kind = max(series, key=lambda k: (sum(p[1]["outlier_channels"] for p in series[k]), k))
    pts = sorted(series[kind], key=lambda p: p[0])
    heat = torch.tensor([p[1]["channel_max_abs"] for p in pts]).clamp_min(1e-3)
    im = axes[2].imshow(heat.numpy(), aspect="auto", interpolation="nearest", norm=LogNorm(vmin=float(heat.min()), vmax=float(heat.max())))
    axes[2].set_title(f"per-channel max |x| of the {kind} input", fontsize=9)
    axes[2].set_xlabel("input channel")
    axes[2].set_ylabel("decoder block")
    fig.colorbar(im, ax=axes[2], fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_activation_report(report: dict, folder: str | Path, title: str = "") -> Path:
    """Write ``activations.json`` and ``activations.png`` into ``folder`` (created), both
    or neither."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LowbitError(f"output {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "activations.png") as png:
        plot_activation_report(report, png, title)
        with atomic_path(folder / "activations.json") as js:
            js.write_text(json.dumps(report, indent=1))
    return folder
