"""The evaluation protocol's perplexity, for the peer scripts (each runs in the peer's own
venv, without lowbit): windows given as token rows, no BOS added, tokens 1..T-1 predicted
from the ones before them, ppl = exp(mean NLL over all predictions)."""

import math
import os

import torch
from safetensors.torch import save_file


@torch.no_grad()
def perplexity(model, windows, save_logits=None):
    """exp(mean NLL); with save_logits, each window's logits also go to that safetensors
    file (tensor "window.<i>", float32 [seq_len, vocab])."""
    total_nll, count = 0.0, 0
    saved = {}
    for i, row in enumerate(windows):
        ids = torch.from_numpy(row).long().unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if save_logits:
            saved[f"window.{i}"] = logits[0].contiguous()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        count += ids.shape[1] - 1
    if save_logits:
        save_file(saved, save_logits + ".tmp")
        os.replace(save_logits + ".tmp", save_logits)
    return math.exp(total_nll / count)
