"""``lowbit qat MODEL --format FMT --steps N -o CKPT``: quantization-aware training
(lowbit.training.qat). Registered by main.py; errors follow main.py's pattern."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .activations import handle_errors
from .options import ThreadsOpt


@handle_errors
def qat(
    model: Annotated[str, typer.Argument(help="Embedded model name (smollm2-135m), a .gguf file, a Hugging Face folder, or a hub id (the float model).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write at the end; the resumable training state lives beside it in OUTPUT.qat/.")],
    weight_format: Annotated[str, typer.Option("--format", "-f", help="Weight format of every decoder Linear: int2..int8, nf4, fp4, bcq1..bcq4, ternary, codebook1..codebook8, ... (see `lowbit quantize --help`).")] = "int4",
    group_size: Annotated[Optional[str], typer.Option("--group-size", "-g", help="Group size ('channel': one per row). Default 64.", show_default=False)] = None,
    asym: Annotated[bool, typer.Option("--asym/--sym", help="Asymmetric integer grids (zero point per group).")] = True,
    init: Annotated[str, typer.Option("--init", help="Starting point: rtn (each group's RTN parameters) or gptq (lowbit's GPTQ on the same format first).")] = "rtn",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 200,
    batch: Annotated[int, typer.Option("--batch", help="Windows per step.")] = 4,
    seq_len_train: Annotated[int, typer.Option("--train-len", help="Tokens per training window.")] = 512,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of the weights (AdamW; linear warm-up, then cosine to 0).")] = 2e-5,
    scale_lr: Annotated[float, typer.Option("--scale-lr", help="Learning rate of the learned scale multipliers (Adam moves each about this much per step; 1e-3 made W4 from GPTQ drift on SmolLM2, see BENCHMARKS.md).")] = 2e-5,
    warmup: Annotated[int, typer.Option("--warmup", help="Learning-rate warm-up steps.")] = 10,
    blend_steps: Annotated[int, typer.Option("--blend-steps", help="Blend quantization in over this many steps: w + lam·(q(w) - w), lam from 0 to 1 (0: quantized from the start).")] = 0,
    distill: Annotated[float, typer.Option("--distill", help="Loss = distill·KL(float model || trained) + (1 - distill)·next-token loss; 1: distillation only.")] = 1.0,
    scales: Annotated[Optional[str], typer.Option("--scales", help="learned (LSQ-style multipliers of each group's parameters) or fixed (refit on the current weights every step). Default: learned; fixed for formats with one scale per matrix or across rows (bitnet, bitnet158, column codebooks, nf4-dq), which cannot learn per-group multipliers.", show_default=False)] = None,
    act_bits: Annotated[Optional[int], typer.Option("--act-bits", help="Also fake-quantize every Linear's input to this many bits, dynamic per token (0: float). Default: 8 symmetric absmax for bitnet and bitnet158 (the papers' BitLinear), float otherwise.", show_default=False)] = None,
    act_asym: Annotated[Optional[bool], typer.Option("--act-asym/--act-sym", help="Asymmetric activations (lowbit's default) or symmetric absmax (BitNet's).", show_default=False)] = None,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in the backward pass (less memory, ~30% slower).")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Write the resumable state every N steps (0: never).")] = 50,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Also evaluate under the protocol every N steps (0: at the end only).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.qat/ (same options), on the same data order.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Text (file or folder): evaluation windows from its start, training from the rest. Default: the embedded Wikipedia articles.")] = None,
    windows: Annotated[int, typer.Option("--windows", help="Evaluation windows (protocol default 20).")] = 20,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per evaluation window (protocol default 512).")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Quantization-aware training: fake quantization with straight-through gradients on any format, then a checkpoint of the real codes, measured under the protocol against the float model."""
    import torch

    from .. import api
    from ..algorithms.base import method_config
    from ..cache import check_writable
    from ..calibration.data import Protocol, bos_id_for, check_lengths, tokenize
    from ..calibration.text import read_text
    from ..evaluation.plots import plot_training
    from ..training.qat import QATConfig, qat as run_qat, training_windows
    from .main import out, parse_group_size, parse_weight_format

    api.set_threads(threads)
    bits, fmt = parse_weight_format(weight_format, None)
    bitnet = fmt in ("bitnet", "bitnet158")
    if scales is None:
        from ..config import WeightSpec
        from ..formats.names import format_of
        from ..nn.fake_quant import learnable_reason

        probe = format_of(WeightSpec(format=fmt or "int", bits=bits or 4, group_size=64))
        scales = "learned" if learnable_reason(probe) is None else "fixed"  # the layers' own rule, once
    if act_bits is None:
        act_bits = 8 if bitnet else 0
    act = False if act_bits == 0 else {"bits": act_bits, "symmetric": (not act_asym) if act_asym is not None else bitnet, "granularity": "token"}
    cfg = QATConfig(steps=steps, batch=batch, lr=lr, scale_lr=scale_lr, warmup_steps=warmup, blend_steps=blend_steps,
                    distill=distill, scales=scales, grad_checkpointing=grad_checkpointing, save_every=save_every,
                    eval_every=eval_every, seed=seed)
    weight = {"symmetric": not asym, "group_size": 64 if group_size is None else parse_group_size(group_size)}
    if fmt is not None:
        weight["format"] = fmt
    if bits is not None:
        weight["bits"] = bits
    config = method_config("rtn", weight=weight, act=act)
    check_writable(output / "lowbit_config.json")
    m, tok, info = api.load(model)
    if info.get("checkpoint") is not None:
        from ..errors import LowbitError

        raise LowbitError(f"{model} is a lowbit checkpoint; QAT starts from the float model (--init gptq starts from lowbit's GPTQ)")
    protocol = Protocol(n_windows=windows, seq_len=seq_len)
    check_lengths(m, seq_len=max(protocol.seq_len, seq_len_train))
    bos = bos_id_for(tok, protocol)
    ids = tokenize(tok, read_text(data))
    evals, calib = api.prepare_windows(tok, protocol, data)
    train_w = training_windows(ids, evals.numel() - (bos is not None) * evals.shape[0], seq_len_train, bos)
    ref, base = api.reference_for(m, info["source"]["fingerprint"], evals, protocol, progress=not quiet)

    def evaluate(model_):
        r = api.evaluate_model(model_, evals, protocol, ref, progress=False)
        return {"ppl": r.ppl, "kl": r.kl, "top1": r.top1}

    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="qat", unit="step", dynamic_ncols=True)

    def on_step(row):
        if bar is not None:
            bar.n = row["step"]
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            bar.refresh()

    state_dir = output.with_name(output.name + ".qat")
    if not resume and (state_dir / "qat-state.pt").exists():
        from ..errors import LowbitError

        raise LowbitError(f"{state_dir} holds an earlier run's state: pass --resume to continue it, or remove it")
    start = time.perf_counter()
    qm, history = run_qat(m, tok, config, train_w, cfg, state_dir, init=init, calib=calib, resume=resume,
                          evaluate=evaluate, on_step=on_step, progress=not quiet)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    final = evaluate(qm)
    results = {"original": {"ppl": base.ppl}, "qat": final, "training_seconds": seconds, "threads": torch.get_num_threads(),
               "train_windows": int(train_w.shape[0])}
    report = api.QuantReport(config=qm.lowbit_config.to_dict() if hasattr(qm.lowbit_config, "to_dict") else {}, layers=[], seconds=seconds,
                             storage=api.storage_summary(qm))

    def write_more(folder: Path) -> None:
        (folder / "training.json").write_text(json.dumps({"config": cfg.__dict__, "history": history}, indent=1))
        plot_training(history, folder / "training.png", title=f"{model}: QAT {weight_format}, init {init}", final=final, base_ppl=base.ppl)

    path = api.save(qm, tok, output, report, source=info["source"], results=results, write_more=write_more)
    out.print(f"float32 perplexity {base.ppl:.2f}; after {steps} steps ({seconds / 60:.1f} min): perplexity {final['ppl']:.2f}, "
              f"KL {final['kl']:.4f}, {report.storage['bits_per_weight']:.3f} bits/weight; wrote {path}/ (training.json, training.png)")
