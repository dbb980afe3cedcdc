"""The evaluation protocol's perplexity, for the peer scripts (each runs in the peer's own
venv, without lowbit): windows given as token rows, no BOS added, tokens 1..T-1 predicted
from the ones before them, ppl = exp(mean NLL over all predictions)."""

import math

import torch


@torch.no_grad()
def perplexity(model, windows):
    total_nll, count = 0.0, 0
    for row in windows:
        ids = torch.from_numpy(row).long().unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        count += ids.shape[1] - 1
    return math.exp(total_nll / count)
