"""``lowbit generate MODEL PROMPT`` and ``lowbit chat MODEL``: run a model or a lowbit
checkpoint on its packed kernels (lowbit.generation). Registered by main.py."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .activations import handle_errors
from .options import ThreadsOpt

ModelArg = Annotated[str, typer.Argument(help="A lowbit checkpoint folder, or a model (embedded name, .gguf, Hugging Face folder) to run in float.")]
KernelOpt = Annotated[str, typer.Option("--kernel", help="Compute path of a checkpoint's layers: auto (int4 for weights of at most 4 bits, packed two codes per byte, on torch's CPU int4 matmul; int8 where weights and activations are both int8; the reference elsewhere), int4, int8 or reference (dequantize, float matmul; codes held unpacked).")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy decoding.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="transformers' repetition penalty (1: none).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampler.")]
VerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Skip the content-hash check of a checkpoint's tensors.")]


def _load(model: str, kernel: str, no_verify: bool, threads: int | None):
    from .. import api
    from ..nn.qlinear import kernel_counts

    api.set_threads(threads)
    m, tok, info = api.load(model, verify=not no_verify, kernel=kernel)
    counts = kernel_counts(m)
    where = ", ".join(f"{n} on {k}" for k, n in sorted(counts.items())) or "float model, no quantized layers"
    typer.echo(f"lowbit: {model}: {where}", err=True)
    return m, tok


def _stats(g) -> str:
    rate = g.decode_tokens_per_s
    decode = f"{rate:.1f} tokens/s decode" if rate == rate else "one token"
    return f"{g.new_tokens} new tokens; prompt {g.prompt_tokens} tokens in {g.prefill_s:.2f} s; {decode}"


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@handle_errors
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="Text to continue (with --chat: a user message).")],
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as one user message in the model's chat template.")] = False,
    max_new_tokens: MaxNewOpt = 128,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.9,
    repetition_penalty: RepOpt = 1.0,
    seed: SeedOpt = 0,
    kernel: KernelOpt = "auto",
    no_verify: VerifyOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Continue a prompt, streaming the new text; tokens/s at the end (on stderr)."""
    from ..generation import chat_prompt, generate as run

    m, tok = _load(model, kernel, no_verify, threads)
    text = chat_prompt(tok, [{"role": "user", "content": prompt}]) if chat else prompt
    g = run(m, tok, text, max_new_tokens, temperature, top_p, repetition_penalty, seed, on_text=_echo, add_special_tokens=not chat)
    _echo("\n")
    typer.echo(f"lowbit: {_stats(g)}", err=True)


@handle_errors
def chat(
    model: ModelArg,
    system: Annotated[str, typer.Option("--system", help="A system message to start the conversation with (none by default).")] = "",
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.9,
    repetition_penalty: RepOpt = 1.1,
    seed: SeedOpt = 0,
    kernel: KernelOpt = "auto",
    no_verify: VerifyOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Talk to the model through its chat template; answers stream, tokens/s after each.
    An empty line or end of input (Ctrl-D) ends the conversation."""
    from ..generation import chat_prompt, generate as run

    m, tok = _load(model, kernel, no_verify, threads)
    messages = [{"role": "system", "content": system}] if system else []
    chat_prompt(tok, messages + [{"role": "user", "content": ""}])  # no template: say so before the first question
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        g = run(m, tok, chat_prompt(tok, messages), max_new_tokens, temperature, top_p, repetition_penalty, seed,
                on_text=_echo, add_special_tokens=False)
        _echo("\n")
        typer.echo(f"lowbit: {_stats(g)}", err=True)
        messages.append({"role": "assistant", "content": g.text})
