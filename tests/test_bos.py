"""BOS at the start of each window is decided by what the model's own tokenizer does,
whatever the source: a Hugging Face folder, or a GGUF (whose tokenizer.ggml.add_bos_token
transformers' conversion drops)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.calibration.data import Protocol, bos_id_for, bos_note
from tests.test_cli import run
from tests.test_gguf_export import _randomize, bpe_tokenizer


def _gguf_field(path, key):
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields[key]
    return f.parts[f.data[0]][0]


def _tiny(arch: str, tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    if arch == "gemma3_text":
        return _randomize(Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=32, sliding_window=32)))
    return _randomize(LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, excerpt):
    """A Gemma-class model whose tokenizer adds BOS, and a Llama whose tokenizer does not,
    each as a Hugging Face folder and as a GGUF written by lowbit."""
    from lowbit.export.gguf_writer import export_gguf

    root = tmp_path_factory.mktemp("bos")
    made = {}
    for arch, adds in (("gemma3_text", True), ("llama", False)):
        tok = bpe_tokenizer(excerpt)
        tok.add_bos_token = adds
        folder = root / arch
        _tiny(arch, tok).save_pretrained(folder)
        tok.save_pretrained(folder)
        model, t, info = lowbit.load(str(folder))
        gguf = export_gguf(model, t, root / f"{arch}.gguf", "F32", source=info["source"]).path
        made[arch] = (folder, gguf)
    return made


def test_hf_folder_whose_tokenizer_adds_bos(folders, cache):
    _, tok, _ = lowbit.load(str(folders["gemma3_text"][0]))
    assert bos_id_for(tok, Protocol()) == tok.bos_token_id == 1
    assert bos_note(tok, Protocol()) == "BOS: added to each window (tokenizer adds it)"
    assert bos_id_for(tok, Protocol(bos="never")) is None


def test_gguf_keeps_add_bos_token(folders, cache):
    gemma, llama = folders["gemma3_text"][1], folders["llama"][1]
    assert bool(_gguf_field(gemma, "tokenizer.ggml.add_bos_token")) is True  # the writer records what the tokenizer does
    assert bool(_gguf_field(llama, "tokenizer.ggml.add_bos_token")) is False
    for _ in range(2):  # the first load makes the float32 cache, the second reads it
        _, tok, _ = lowbit.load(str(gemma))
        assert tok("a")["input_ids"][0] == tok.bos_token_id  # the loaded tokenizer itself adds it
        assert bos_id_for(tok, Protocol()) == 1
    _, tok, _ = lowbit.load(str(llama))
    assert bos_id_for(tok, Protocol()) is None
    assert bos_note(tok, Protocol()) == "BOS: none (tokenizer does not add it)"
    assert bos_id_for(tok, Protocol(bos="always")) == 1


def test_gguf_cache_made_without_the_flag_is_corrected(folders, cache):
    """A float32 cache written before BOS was kept: its tokenizer adds none; loading fixes it."""
    from transformers import AutoTokenizer

    from lowbit.models.loader import float32_folder

    gguf = folders["gemma3_text"][1]
    folder = float32_folder(str(gguf))
    stale = AutoTokenizer.from_pretrained(str(folder))
    stale.add_bos_token = False
    stale.save_pretrained(str(folder))
    assert AutoTokenizer.from_pretrained(str(folder))("a")["input_ids"][0] != 1
    _, tok, _ = lowbit.load(str(gguf))
    assert bos_id_for(tok, Protocol()) == 1


def test_eval_header_names_the_choice(folders, cache, excerpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(excerpt)
    r = run("eval", folders["gemma3_text"][1], "--data", text, "--windows", "1", "--seq-len", "32", "-q")
    assert r.exit_code == 0, r.output
    assert "BOS: added to each window (tokenizer adds it)" in r.stdout
    r = run("eval", folders["gemma3_text"][1], "--data", text, "--windows", "1", "--seq-len", "32", "-q", "--bos", "never")
    assert "BOS: none (--bos never)" in r.stdout


def _as_sentencepiece_gguf(src, dst, n_vocab: int, add_bos: bool):
    """``src`` (a lowbit-written gemma3 GGUF, BPE vocabulary) rewritten with a
    SentencePiece ("llama") vocabulary, as Gemma's own GGUFs have: the path transformers
    converts with its Gemma tokenizer."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "gemma3")
    for k, f in r.fields.items():
        if k.startswith(("tokenizer.", "GGUF.")) or k == "general.architecture" or f.types[0] == GGUFValueType.ARRAY:
            continue
        if f.types[0] == GGUFValueType.STRING:
            w.add_string(k, f.parts[f.data[0]].tobytes().decode())
        else:
            w.add_key_value(k, f.parts[f.data[0]][0], f.types[0])
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["\u2581"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"x{i}" for i in range(n_vocab - len(vocab))]
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_vocab - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_gemma_gguf(folders, cache, tmp_path, add_bos):
    """The reported case (a Gemma GGUF): after the float32 cache is saved and reloaded, the
    tokenizer still adds BOS but its add_bos_token attribute reads False."""
    src = folders["gemma3_text"][1]
    from gguf import GGUFReader

    n_vocab = len(GGUFReader(str(src)).fields["tokenizer.ggml.tokens"].data)
    dst = tmp_path / "gemma-spm.gguf"
    _as_sentencepiece_gguf(src, dst, n_vocab, add_bos)
    _, tok, _ = lowbit.load(str(dst))
    assert (tok("a b")["input_ids"][0] == 1) is add_bos
    assert bos_id_for(tok, Protocol()) == (1 if add_bos else None)
