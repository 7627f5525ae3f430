"""llama.py against transformers' LlamaForCausalLM (tiny random models in the real HF checkpoint formats)."""
import io
import json
import os
import shutil

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM
from transformers import LlamaTokenizer as HFLlamaTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

import cli
import llama
import sampling
from weights import LlamaTokenizer, load_llama, save_llama

CONFIGS = {
    "mha": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=320,
                rms_norm_eps=1e-5),
    "gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, rope_theta=500000.0),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_hf(name, seed=0):
    torch.manual_seed(seed)
    # no eos: transformers' generate then always runs max_new_tokens steps, like ours with eos_token_id=None
    cfg = HFConfig(**CONFIGS[name], bos_token_id=1, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained directory, directory)."""
    hf = make_hf(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return hf, load_llama(path).eval(), path


def test_config_and_names(pair):
    hf, ours, _ = pair
    assert ours.config.num_key_value_heads == hf.config.num_key_value_heads
    assert ours.config.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert ours.config.rms_norm_eps == hf.config.rms_norm_eps
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert list(our_state) == list(hf_state)  # identical keys, identical order
    for k in hf_state:
        assert torch.equal(our_state[k], hf_state[k]), k


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(ours(ids), want) <= 1e-4
        # embeddings first, then ids
        embeds = ours.embed(ids[:, :5])
        assert rel_err(ours(input_ids=ids[:, 5:], inputs_embeds=embeds), want) <= 1e-4


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_generation_matches_transformers(pair, penalty):
    hf, ours, _ = pair
    ids = torch.randint(3, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                       repetition_penalty=penalty)[:, ids.shape[1]:]
    got = ours.generate(ids, max_new_tokens=32, repetition_penalty=penalty)
    assert want.shape == (1, 32)
    assert torch.equal(got, want)


def test_kv_cache_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)  # (2, 16, V)
        logits, cache = ours.prefill(ours.embed(ids[:, :6]), None, 16)
        steps = [logits]
        for t in range(6, 15):
            steps.append(ours.decode_step(ids[:, t], cache))
    assert cache.length == 15
    assert rel_err(torch.stack(steps, dim=1), full[:, 5:15]) <= 1e-5


def test_left_padded_batch_equals_rows_alone(pair):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, ours.config.vocab_size, (n,), generator=g) for n in (9, 4, 6)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    with torch.no_grad():
        batch_logits = ours(ids, attention_mask=mask)
        batch_tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=12, repetition_penalty=1.1)
        for i, r in enumerate(rows):
            alone = ours(r[None])
            assert rel_err(batch_logits[i, L - len(r):], alone[0]) <= 1e-5
            assert torch.equal(batch_tokens[i], ours.generate(r[None], max_new_tokens=12, repetition_penalty=1.1)[0])


def test_left_padding_matches_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(3, hf.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert rel_err(got[0], want[0]) <= 1e-4
    assert rel_err(got[1, 4:], want[1, 4:]) <= 1e-4


def test_sharded_checkpoints(tmp_path):
    """Sharded safetensors (transformers' own) and sharded pytorch_model-*.bin with a stray inv_freq buffer."""
    hf = make_hf("gqa")
    hf.save_pretrained(tmp_path / "st", max_shard_size="40KB")
    assert (tmp_path / "st" / "model.safetensors.index.json").exists()
    state = hf.state_dict()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    keys = list(state)
    names = [f"pytorch_model-0000{i + 1}-of-00003.bin" for i in range(3)]
    weight_map = {}
    for i, name in enumerate(names):
        shard = {k: state[k].clone() for k in keys[i::3]}
        if i == 0:  # what checkpoints written by old transformers carry
            shard["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(shard, bin_dir / name)
        weight_map.update({k: name for k in shard})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for d in ("st", "bin"):
        ours = load_llama(str(tmp_path / d))
        assert set(ours.state_dict()) == set(state)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, state[k]), (d, k)


def test_dtype_and_device_arguments(pair):
    _, _, path = pair
    model = load_llama(path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_loud_key_errors(tmp_path):
    hf = make_hf("mha")
    base = tmp_path / "base"
    hf.save_pretrained(base)
    state = load_file(base / "model.safetensors")

    def variant(name, new_state):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((base / "config.json").read_text())
        save_file(new_state, d / "model.safetensors")
        return str(d)

    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_llama(variant("missing", missing))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): model\.layers\.0\.extra\.weight "
                                         r"\(in model\.safetensors\)"):
        load_llama(variant("unexpected", {**state, "model.layers.0.extra.weight": torch.ones(2)}))
    shaped = {**state, "model.norm.weight": torch.ones(63)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight: file \(63,\) vs model \(64,\) "
                                         r"\(in model\.safetensors\)"):
        load_llama(variant("shape", shaped))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(str(tmp_path))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_llama(str(tmp_path / "noweights"))
    cfg = json.loads((base / "config.json").read_text())
    (tmp_path / "tied").mkdir()
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_llama(str(tmp_path / "tied"))


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    save_llama(ours, str(tmp_path))
    back = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.rope_parameters["rope_theta"] == ours.config.rope_theta
    ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) <= 1e-6
    again = load_llama(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_training_autocast_checkpointing_grads_reach_inputs(pair):
    """Frozen weights, bf16 autocast, per-layer checkpointing: gradients flow to inputs_embeds (as for audio tokens)."""
    _, ours, path = pair
    model = load_llama(path).train()
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(7))
    prefix = torch.randn(2, 3, model.hidden_size, generator=torch.Generator().manual_seed(8))

    def grad(checkpointing, autocast):
        model.gradient_checkpointing = checkpointing
        x = prefix.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, inputs_embeds=x)
        F.cross_entropy(logits[:, 3:-1].float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        return x.grad

    plain = grad(False, False)
    assert plain.abs().sum() > 0
    assert torch.allclose(grad(True, False), plain, rtol=1e-5, atol=1e-8)
    low = grad(True, True)
    assert torch.isfinite(low).all() and rel_err(low, plain) < 0.1
    assert all(p.grad is None for p in model.parameters())


# --- tokenizer ---------------------------------------------------------------------------------------------------

TEXT = ["The quick brown fox jumps over the lazy dog.", "A dog barks; a cat meows. Birds sing in the morning!",
        "Audio language models answer questions about sounds 1234.", "Rain falls on the roof,  thunder rolls away.",
        "Close-ended question: Write an audio caption describing the sound."] * 8


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A tiny BPE sentencepiece model trained like LLaMA's (byte fallback, no normalisation, split digits)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_tokenizer_matches_transformers(tokenizer_file):
    # transformers 5 converts tokenizer.model through protobuf (not installed); its protobuf-free extractor gives the
    # same vocab and merges, and LlamaTokenizer runs them through its own (Rust) BPE.
    vocab, _, merges = SentencePieceExtractor(tokenizer_file).extract()
    hf = HFLlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok = LlamaTokenizer(tokenizer_file)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 320)
    # Text that starts with whitespace is left out: transformers' Metaspace then drops the "▁" sentencepiece adds.
    for text in ["Hello world, the dog barks.", "Würzburg 音 2024\tdone", "a cat\nmeows  ", TEXT[4]]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"]
        assert ids[0] == 1 and tok.encode(text, bos=False) == ids[1:]
        assert tok.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)
    assert tok.encode("x", eos=True)[-1] == 2


def test_cli_generates(tokenizer_file, tmp_path, capsys):
    hf = make_hf("mha")  # vocab 320, like the tokenizer
    hf.save_pretrained(tmp_path)
    shutil.copy(tokenizer_file, tmp_path / "tokenizer.model")
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "The dog", "--greedy",
                     "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    tok = LlamaTokenizer(str(tmp_path))
    prompt = tok.encode("The dog")
    want = load_llama(str(tmp_path)).generate(torch.tensor([prompt]), max_new_tokens=8, repetition_penalty=1.1,
                                              eos_token_id=2)[0].tolist()
    want = want[:want.index(2)] if 2 in want else want
    assert out == tok.decode(prompt + want) + "\n" and out.startswith("The dog") and len(out) > len("The dog\n")
    os.remove(tmp_path / "tokenizer.model")
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "tokenizer.model" in capsys.readouterr().err


def test_attention_without_padding_passes_no_mask(pair, monkeypatch):
    """Without padding, scaled_dot_product_attention gets is_causal=True and no mask (so flash attention can run);
    decode steps pass no mask either. Only left-padded batches build one. The results match transformers."""
    hf, ours, _ = pair
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    ids = torch.randint(3, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # transformers' attention calls the function too: run it first
        want = hf(ids).logits
        want_new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)[:, 9:]
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    n_layers = ours.config.num_hidden_layers
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids)):
            calls.clear()
            assert rel_err(ours(ids, attention_mask=mask), want) <= 1e-4
            assert calls == [(9, 9, True, True)] * n_layers
        calls.clear()
        assert torch.equal(sampling.generate(ours, ids, max_new_tokens=3), want_new)
        assert calls == [(9, 9, True, True)] * n_layers + [(1, 10, True, False)] * n_layers + \
            [(1, 11, True, False)] * n_layers
        calls.clear()
        padded = torch.ones_like(ids)
        padded[1, :3] = 0
        ours.prefill(ours.embed(ids), padded, 12)
        assert calls == [(9, 9, False, False)] * n_layers


def test_generation_input_errors(pair):
    _, ours, _ = pair
    embeds = ours.embed(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="left-padded"):
        ours.prefill(embeds, torch.tensor([[1, 1, 0]]), 8)
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours.prefill(embeds, torch.tensor([[1, 1]]), 8)
    with pytest.raises(ValueError, match="num_attention_heads 32 must be divisible by num_key_value_heads 5"):
        llama.LlamaConfig(num_key_value_heads=5)
    with pytest.raises(ValueError, match="hidden_size 100 must be divisible by num_attention_heads 32"):
        llama.LlamaConfig(hidden_size=100)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.prefill(embeds, None, ours.config.max_position_embeddings + 1)
    _, cache = ours.prefill(embeds, None, 4)
    ours.decode_step(torch.tensor([8]), cache)
    with pytest.raises(ValueError, match="cache is full"):
        ours.decode_step(torch.tensor([9]), cache)
