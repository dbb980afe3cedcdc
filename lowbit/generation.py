"""Text generation from a model or a lowbit checkpoint: transformers' ``generate`` (with its
KV cache) on lowbit's modules, streamed, timed as prefill and decode.

The model runs whatever compute path its layers are on: a checkpoint loaded with
``lowbit.load(path, kernel="auto")`` holds its weights packed and multiplies them packed
(lowbit.nn.int4, lowbit.nn.int8). Chat prompts go through the tokenizer's own chat template.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .errors import LowbitError


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # prompt forward pass, up to the first new token
    decode_s: float  # the remaining new tokens

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return asdict(self) | {"decode_tokens_per_s": self.decode_tokens_per_s}


class _Streamer:
    """Receives transformers' token stream: times the first new token and passes the text
    on as whole words (transformers' TextStreamer does the decoding)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        from transformers import TextStreamer

        class Words(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if on_text is not None and text:
                    on_text(text)

        self.words = Words(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt, the second the first new token
            self.first_token_at = time.perf_counter()
        self.words.put(value)

    def end(self) -> None:
        self.words.end()


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text for a conversation, by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template; use `lowbit generate` with a plain prompt")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    add_special_tokens: bool = True,
    ignore_eos: bool = False,
) -> Generation:
    """Continue ``prompt``; temperature 0 is greedy decoding. ``on_text`` receives the new
    text as it is produced. ignore_eos=True always makes max_new_tokens tokens (benchmarks)."""
    if max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise LowbitError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise LowbitError(f"--top-p must be in (0, 1], got {top_p}")
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    ids = enc["input_ids"]
    if ids.shape[1] == 0:
        raise LowbitError("the prompt is empty after tokenization")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise LowbitError(f"prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's {limit} positions")
    sampling = temperature > 0
    kwargs = dict(do_sample=sampling, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                  min_new_tokens=max_new_tokens if ignore_eos else None)
    if sampling:
        kwargs |= dict(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs |= dict(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = _Streamer(tokenizer, on_text)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=enc.get("attention_mask"), streamer=streamer, pad_token_id=pad, **kwargs)
    end = time.perf_counter()
    new = out[0, ids.shape[1]:]
    first = streamer.first_token_at or end
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=int(ids.shape[1]),
        new_tokens=int(new.numel()),
        prefill_s=first - start,
        decode_s=end - first,
    )
