"""Quantization-aware training of a whole model on any weight format (lowbit.nn.fake_quant).

    model (float, or quantized by a PTQ method first: ``init="gptq"``)
      -> every decoder Linear becomes a FakeQuantLinear (its PTQ codes' parameters as the start)
      -> steps of AdamW on next-token loss and/or KL to the float model's logits, a cosine
         learning rate after a linear warm-up, quantization blended in over ``blend_steps``
      -> QuantLinear layers holding the final codes (a lowbit checkpoint)

Training windows come from the text after the evaluation windows (never the evaluation
windows themselves), in an order fixed by the seed: step t reads windows
order[t·batch : (t+1)·batch] (cycling). The state (trainable tensors, AdamW's moments, the
step, the losses so far) is written every ``save_every`` steps under a temporary name and
renamed, so a killed run resumes from its last state and continues the same loss curve.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import WeightSpec
from ..errors import LowbitError
from ..nn.fake_quant import FakeQuantLinear, encoded_of
from ..nn.qlinear import QuantLinear, set_submodule

STATE = "qat-state.pt"


@dataclass(frozen=True)
class QATConfig:
    steps: int = 200
    batch: int = 4  # windows per step
    lr: float = 2e-5  # the weights'
    # the learned scale multipliers': Adam moves each by about this much per step whatever its
    # gradient's size (LSQ's gradient scale does not survive Adam's normalization). Measured on
    # SmolLM2-135M W4 g64 from GPTQ, 60 steps of 2 x 256 tokens: 1e-3 drifted from perplexity
    # 29.07 to 38.68; 2e-5 (EfficientQAT's order for step sizes) ends at 29.09 (BENCHMARKS.md).
    scale_lr: float = 2e-5
    warmup_steps: int = 10  # linear learning-rate warm-up, then cosine to 0
    blend_steps: int = 0  # quantization blended in over this many steps (lam 0 -> 1)
    distill: float = 1.0  # loss = distill·KL(float || student) + (1 - distill)·next-token CE
    scales: str = "learned"  # or fixed
    grad_checkpointing: bool = False
    save_every: int = 50
    eval_every: int = 0  # 0: evaluate at the end only
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("steps", "batch"):
            if getattr(self, k) < 1:
                raise LowbitError(f"{k} must be at least 1, got {getattr(self, k)}")
        for k in ("warmup_steps", "blend_steps", "save_every", "eval_every"):
            if getattr(self, k) < 0:
                raise LowbitError(f"{k.replace('_', '-')} must be 0 or more, got {getattr(self, k)}")
        if not 0 <= self.distill <= 1:
            raise LowbitError(f"distill must be in [0, 1], got {self.distill}")
        if self.lr <= 0 or self.scale_lr < 0:
            raise LowbitError("learning rates must be positive")
        if self.scales not in ("learned", "fixed"):
            raise LowbitError(f"scales must be learned or fixed, got {self.scales!r}")


def training_windows(ids: torch.Tensor, skip: int, length: int, bos_id: int | None) -> torch.Tensor:
    """Windows of ``length`` tokens from ids[skip:] (the evaluation windows take ids[:skip])."""
    body = length - (bos_id is not None)
    n = (ids.numel() - skip) // body
    if n < 1:
        raise LowbitError(f"the text has no room for training windows of {length} tokens after the evaluation windows")
    w = ids[skip : skip + n * body].reshape(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], 1)
    return w


def lr_factor(step: int, cfg: QATConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))


def blend(step: int, cfg: QATConfig) -> float:
    return 1.0 if cfg.blend_steps == 0 else min(1.0, (step + 1) / cfg.blend_steps)


def wrap(model: nn.Module, spec_for: Callable[[str], WeightSpec | None], scales: str, act=None) -> list[str]:
    """Replace every decoder Linear (float or QuantLinear) by a FakeQuantLinear; its names."""
    from ..models.arch import decoder_layers

    prefix, _ = decoder_layers(model)
    names = []
    for name, mod in list(model.named_modules()):
        if not name.startswith(prefix + "."):
            continue
        if isinstance(mod, QuantLinear):
            if mod.wspec is None:
                continue
            fq = FakeQuantLinear(mod.dequantized_weight(), mod.bias, mod.wspec, scales, init=encoded_of(mod), name=name, act=act)
        elif isinstance(mod, nn.Linear):
            spec = spec_for(name)
            if spec is None:
                continue
            fq = FakeQuantLinear(mod.weight, mod.bias, spec, scales, name=name, act=act)
        else:
            continue
        set_submodule(model, name, fq)
        names.append(name)
    if not names:
        raise LowbitError("no decoder Linear to train: every layer is ignored or in float")
    return names


def unwrap(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FakeQuantLinear):
            set_submodule(model, name, mod.to_quant_linear())


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(path: Path, model, opt, step: int, history: list[dict]) -> None:
    state = {"step": step, "params": {n: p.detach().clone() for n, p in _trainable(model).items()},
             "opt": opt.state_dict(), "history": json.dumps(history)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model, opt) -> tuple[int, list[dict]]:
    state = torch.load(path, weights_only=True)  # tensors and plain values only: no code runs
    params = _trainable(model)
    if set(state["params"]) != set(params):
        raise LowbitError(f"{path}: its trained tensors do not match this model and format (another run's state?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["opt"])
    return int(state["step"]), json.loads(state["history"])


def train(model: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, cfg: QATConfig, state_dir: Path,
          resume: bool = False, evaluate: Callable[[nn.Module], dict] | None = None,
          on_step: Callable[[dict], None] | None = None, stop_after: int | None = None) -> list[dict]:
    """Train the wrapped ``model`` (FakeQuantLinear layers) in place; the history of steps.

    teacher: the float model for distillation (needed when cfg.distill > 0). stop_after:
    return after this many steps of this call (tests kill runs this way)."""
    if cfg.distill > 0 and teacher is None:
        raise LowbitError("distillation needs the float model as teacher")
    for p in model.parameters():
        p.requires_grad_(False)
    fq = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    weights = [m.weight for m in fq]
    mults = [m.mult for m in fq if hasattr(m, "mult")]
    for p in weights + mults:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": cfg.lr}] + ([{"params": mults, "lr": cfg.scale_lr}] if mults else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / STATE
    step, history = 0, []
    if resume and state_path.exists():
        step, history = load_state(state_path, model, opt)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    if evaluate is not None and cfg.eval_every and step == 0 and not history:
        history.append({"step": 0, "tokens": 0, "eval": evaluate(model), "lam": blend(0, cfg)})  # the PTQ start of the curve
    model.train()
    done_here = 0
    try:
        while step < cfg.steps:
            idx = torch.arange(step * cfg.batch, (step + 1) * cfg.batch) % windows.shape[0]
            ids = windows[order[idx]]
            lam = blend(step, cfg)
            for m in fq:
                m.lam = lam
            for g, base in zip(opt.param_groups, (cfg.lr, cfg.scale_lr)):
                g["lr"] = base * lr_factor(step, cfg)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            logp = F.log_softmax(logits, -1)
            ce = F.nll_loss(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
            kl = torch.zeros(())
            if cfg.distill > 0:
                with torch.no_grad():
                    ref = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
                kl = F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1).mean()
            loss = cfg.distill * kl + (1 - cfg.distill) * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            done_here += 1
            row = {"step": step, "tokens": step * cfg.batch * ids.shape[1], "loss": float(loss.detach()), "ce": float(ce.detach()),
                   "kl": float(kl.detach()), "lam": lam, "lr": opt.param_groups[0]["lr"],
                   "tokens_per_s": ids.numel() / (time.perf_counter() - t0)}
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                model.eval()
                row["eval"] = evaluate(model)
                model.train()
            history.append(row)
            if on_step:
                on_step(row)
            if cfg.save_every and step % cfg.save_every == 0:
                save_state(state_path, model, opt, step, history)
            if stop_after is not None and done_here >= stop_after:
                break
    finally:
        model.eval()
        if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        for p in weights + mults:
            p.requires_grad_(False)
    return history


def qat(model: nn.Module, tokenizer, config, windows: torch.Tensor, cfg: QATConfig, out_dir: Path,
        init: str = "rtn", calib: torch.Tensor | None = None, resume: bool = False,
        evaluate: Callable[[nn.Module], dict] | None = None, on_step=None, stop_after: int | None = None,
        progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """The whole job on a float ``model``: PTQ start (``init``: rtn keeps each layer's RTN
    parameters as the start, gptq runs lowbit's GPTQ first), training, final QuantLinears.
    Returns (the quantized model, the history). ``config``: the QuantConfig of the formats."""
    from .. import api

    teacher = copy.deepcopy(model) if cfg.distill > 0 else None
    if init == "gptq":
        api.quantize(model, dataclasses.replace(config, method="gptq", options={}), calib, progress=progress)
    elif init != "rtn":
        raise LowbitError(f"init must be rtn or gptq, got {init!r}")
    wrap(model, lambda n: None if config.is_ignored(n) else config.weight_spec_for(n), cfg.scales, config.act)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = train(model, teacher, windows, cfg, out_dir, resume, evaluate, on_step, stop_after)
    if history and history[-1]["step"] < cfg.steps:
        return model, history  # stopped early (tests); the state file holds the run
    unwrap(model)
    model.lowbit_config = dataclasses.replace(config, method="qat", options={"init": init, **dataclasses.asdict(cfg)})
    return model, history
