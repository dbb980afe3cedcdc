"""llama.cpp's importance matrix: per input column of each Linear, the mean of x^2 over
all calibration tokens.

The GGUF k-quant searches weigh each weight's squared error by its column's importance
(``lowbit.formats.gguf.quantize_tensor(w, type, importance)``), which is exactly the
expected squared error of the layer's output when inputs are uncorrelated across
columns. The statistics are taken on the float model, in one pass through lowbit's
block-wise runner (one forward per block, inputs threaded from block to block), so the
calibration tokens, BOS handling and memory profile are those of every other method.

``save_imatrix``/``load_imatrix`` read and write llama.cpp's imatrix GGUF layout
(``<tensor>.in_sum2`` and ``<tensor>.counts`` per GGUF weight name; general.type
"imatrix"), so llama-quantize can use an imatrix made here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..runner import BlockContext, run_blocks

log = logging.getLogger(__name__)


class ColumnSquares:
    """Running mean of x^2 per input column (sums in float64, so the result does not
    depend on how the tokens are batched): one Linear's importance."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        s = (x * x).sum(dim=0)
        self.sum = s if self.sum is None else self.sum + s
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.sum is None or self.n == 0:
            raise LowbitError("imatrix: this layer saw no calibration inputs")
        return (self.sum / self.n).to(torch.float32)


def collect_imatrix(model: torch.nn.Module, calib_windows: torch.Tensor, progress=None) -> dict[str, torch.Tensor]:
    """{full Linear name (e.g. ``model.layers.0.self_attn.q_proj``): float32 [in_features]}.

    Runs the float model on ``calib_windows`` ([n, seq_len] token ids) block by block;
    the model is not modified.
    """
    if calib_windows is None or calib_windows.numel() == 0:
        raise LowbitError("imatrix: no calibration windows")
    acc: dict[str, ColumnSquares] = {}

    def one_block(ctx: BlockContext) -> torch.Tensor:
        def observe(name):
            full = ctx.full_name(name)
            a = acc.setdefault(full, ColumnSquares())
            return lambda _module, args: a.update(args[0])

        return ctx.forward_with_hooks({name: observe(name) for name in ctx.linears()})

    run_blocks(model, one_block, calib_windows, progress=progress)
    result = {name: a.mean() for name, a in acc.items() if a.n}
    for name, v in result.items():
        if not torch.isfinite(v).all():
            raise LowbitError(f"imatrix: layer {name} saw non-finite activations")
    log.info("imatrix: %d layers over %d tokens", len(result), calib_windows.numel())
    return result


def save_imatrix(path: str | Path, imatrix_by_gguf_name: dict[str, np.ndarray], n_tokens: int, chunk_size: int, dataset: str = "") -> Path:
    """Write an imatrix in llama.cpp's GGUF layout. Keys are GGUF weight names
    (``blk.0.attn_q.weight``); llama.cpp stores the sum of x^2 ([1, cols]) and the number
    of tokens summed ([1, 1]), so the mean is turned back into a sum over ``n_tokens``."""
    import gguf

    from ..cache import atomic_path

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset or "lowbit calibration windows"])
        w.add_uint32("imatrix.chunk_count", max(1, n_tokens // max(1, chunk_size)))
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(imatrix_by_gguf_name):
            mean = np.asarray(imatrix_by_gguf_name[name], dtype=np.float64)
            w.add_tensor(f"{name}.in_sum2", (mean * n_tokens).astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[n_tokens]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Read a llama.cpp imatrix GGUF: {GGUF weight name: mean of x^2 per column}."""
    from ..models.gguf_read import open_gguf

    reader = open_gguf(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    out = {}
    for name, data in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            count = tensors.get(f"{base}.counts")
            if count is None or count.size != 1 or count[0] <= 0:
                raise LowbitError(f"imatrix {path}: tensor {base} has no usable .counts")
            out[base] = (data / count[0]).astype(np.float32)
    if not out:
        raise LowbitError(f"{path} holds no imatrix entries (*.in_sum2)")
    return out
