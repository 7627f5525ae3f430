"""The Mamba language model against transformers' MambaForCausalLM on tiny random checkpoints in the real formats."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM, PreTrainedTokenizerFast
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import cli
import lora
import mamba
import sampling
from mamba import MambaConfig, MambaLM
from weights import MambaTokenizer, load_mamba, save_mamba

TINY = dict(vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=3)  # vocab 104 = 100 padded to 8
BIASED = dict(vocab_size=200, hidden_size=48, state_size=4, num_hidden_layers=2, use_bias=True,
              use_conv_bias=False, time_step_rank=5)


def hf_model(seed: int, **kw) -> MambaForCausalLM:
    """A tiny random MambaForCausalLM whose every parameter matters (HF's init leaves norms and D at 1 and makes a
    random model repeat its last token); scaled so that greedy decoding wanders through the vocabulary."""
    torch.manual_seed(seed)
    model = MambaForCausalLM(HFMambaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith((".D", "norm.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("norm_f.weight"):
                p.normal_()
            elif "embeddings" in name:
                p.normal_(0, 0.5)
            elif name.endswith(("dt_proj.bias", "conv1d.bias", "in_proj.bias", "out_proj.bias")):
                p.add_(0.3 * torch.randn_like(p))
            elif "out_proj" in name:
                p.mul_(4)
            elif "in_proj" in name:
                p.mul_(2)
    return model


def to_original_format(hf_dir: str, out_dir: str, weights: str, vocab: int = 100):
    """Rewrite an HF checkpoint in mamba_ssm's format: d_model/n_layer config with the unpadded vocabulary,
    `backbone.embedding.weight`, and (in pytorch_model.bin, as torch.save writes a tied model) lm_head.weight."""
    os.makedirs(out_dir, exist_ok=True)
    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    config = dict(d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], vocab_size=vocab,
                  ssm_cfg=dict(d_state=hf["state_size"]), rms_norm=True, residual_in_fp32=True,
                  fused_add_norm=True, pad_vocab_size_multiple=8)
    json.dump(config, open(os.path.join(out_dir, "config.json"), "w"))
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    state = {k.replace("embeddings", "embedding"): v for k, v in state.items()}
    if weights == "pytorch_model.bin":
        state["lm_head.weight"] = state["backbone.embedding.weight"]
        torch.save(state, os.path.join(out_dir, weights))
    else:
        save_file(state, os.path.join(out_dir, weights))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny HF model and its checkpoint folders in every supported layout."""
    root = tmp_path_factory.mktemp("mamba")
    model = hf_model(0, **TINY)
    dirs = {"hf": str(root / "hf"), "hf_sharded": str(root / "hf_sharded"),
            "original_safetensors": str(root / "orig_st"), "original_bin": str(root / "orig_bin")}
    model.save_pretrained(dirs["hf"])
    model.save_pretrained(dirs["hf_sharded"], max_shard_size="20KB")
    to_original_format(dirs["hf"], dirs["original_safetensors"], "model.safetensors")
    to_original_format(dirs["hf"], dirs["original_bin"], "pytorch_model.bin")
    return model, dirs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("layout", ["hf", "hf_sharded", "original_safetensors", "original_bin"])
def test_logits_match_transformers(ckpt, layout):
    hf, dirs = ckpt
    assert layout != "hf_sharded" or os.path.exists(os.path.join(dirs[layout], "model.safetensors.index.json"))
    ours = load_mamba(dirs[layout])
    assert ours.config.vocab_size == 104
    ids = torch.randint(0, 104, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(ours(ids), want) <= 1e-4
        last, cache = ours.prefill(ours.embed(ids))
        assert rel_err(last, want[:, -1]) <= 1e-4


def test_bias_variant_matches_transformers(tmp_path):
    hf = hf_model(1, **BIASED)
    hf.save_pretrained(tmp_path)
    ours = load_mamba(str(tmp_path))
    assert ours.config.dt_rank == 5 and ours.backbone.layers[0].mixer.conv1d.bias is None
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.1])
def test_greedy_tokens_match_transformers(ckpt, repetition_penalty):
    hf, dirs = ckpt
    ours = load_mamba(dirs["hf"])
    for seed in range(2):
        ids = torch.randint(1, 104, (1, 7), generator=torch.Generator().manual_seed(seed))
        want = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                           repetition_penalty=repetition_penalty)[:, ids.shape[1]:]
        got = ours.generate(ids, max_new_tokens=32, repetition_penalty=repetition_penalty)
        assert got.shape == (1, 32) and len(set(want[0].tolist())) > 8  # the test model does not just repeat
        assert torch.equal(got, want)


def test_decode_steps_equal_full_forward(ckpt):
    _, dirs = ckpt
    ours = load_mamba(dirs["hf"])
    ids = torch.randint(0, 104, (3, 24), generator=torch.Generator().manual_seed(3))
    prompt = 5
    with torch.no_grad():
        full = ours(ids)
        logits, cache = ours.prefill(ours.embed(ids[:, :prompt]))
        cfg = ours.config
        assert cache.conv.shape == (cfg.n_layer, 3, cfg.d_inner, cfg.d_conv)
        assert cache.ssm.shape == (cfg.n_layer, 3, cfg.d_inner, cfg.d_state) and cache.ssm.dtype == torch.float32
        pointers = cache.conv.data_ptr(), cache.ssm.data_ptr()
        assert rel_err(logits, full[:, prompt - 1]) <= 1e-4
        for t in range(prompt, ids.shape[1]):
            logits = ours.decode_step(ids[:, t], cache)
            assert rel_err(logits, full[:, t]) <= 1e-4, t
        assert (cache.conv.data_ptr(), cache.ssm.data_ptr()) == pointers and cache.length == ids.shape[1]
        _, long_cache = ours.prefill(ours.embed(ids))
        assert long_cache.conv.shape == cache.conv.shape and long_cache.ssm.shape == cache.ssm.shape


@pytest.mark.parametrize("config", ["tiny", "biased"])
def test_left_padded_batch_equals_rows_alone(ckpt, tmp_path, config):
    if config == "tiny":
        ours = load_mamba(ckpt[1]["hf"])
    else:  # in_proj has a bias: zeroing the mixer input alone would not keep padding out of the conv
        hf_model(1, **BIASED).save_pretrained(tmp_path)
        ours = load_mamba(str(tmp_path))
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, vocab, (n,), generator=g) for n in (3, 9, 14)]
    width = max(len(r) for r in rows)
    ids = torch.randint(1, vocab, (len(rows), width), generator=g)  # padding with random tokens, not zeros
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        logits, _ = ours.prefill(ours.embed(ids), mask)
        full = ours(ids, attention_mask=mask)
        batch = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
        for i, r in enumerate(rows):
            alone, _ = ours.prefill(ours.embed(r[None]))
            assert rel_err(logits[i], alone[0]) <= 1e-5
            assert rel_err(full[i, width - len(r):], ours(r[None])[0]) <= 1e-5
            assert torch.equal(batch[i], ours.generate(r[None], max_new_tokens=12)[0])
        unmasked, _ = ours.prefill(ours.embed(ids))
        assert rel_err(unmasked[0], logits[0]) > 1e-2  # without the mask the padding does change the answer
        with pytest.raises(ValueError, match="left-padded"):  # right padding would answer from the padding
            ours.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)
        with pytest.raises(ValueError, match="attention_mask must be"):
            ours(ids, attention_mask=mask[:, 1:])


def test_inputs_embeds_then_ids(ckpt):
    hf, dirs = ckpt
    ours = load_mamba(dirs["hf"])
    g = torch.Generator().manual_seed(5)
    embeds, ids = torch.randn(2, 4, 32, generator=g), torch.randint(0, 104, (2, 6), generator=g)
    with torch.no_grad():
        want = hf(inputs_embeds=torch.cat([embeds, hf.backbone.embeddings(ids)], dim=1)).logits
        assert rel_err(ours(ids, inputs_embeds=embeds), want) <= 1e-4
        new = ours.generate(ids, inputs_embeds=embeds, max_new_tokens=4)
        step = sampling.next_token(want[:, -1], ids)
        assert torch.equal(new[:, 0], step)


def test_gradients_reach_inputs_embeds(ckpt):
    """Frozen LLM, trainable inputs: d loss / d inputs_embeds equals transformers'; also with gradient
    checkpointing, and close under bf16 autocast."""
    hf, dirs = ckpt
    ours = load_mamba(dirs["hf"]).requires_grad_(False)
    hf.requires_grad_(False)
    g = torch.Generator().manual_seed(6)
    embeds, weights = torch.randn(2, 10, 32, generator=g), torch.randn(2, 10, 104, generator=g)

    def grad(model, checkpointing=False, autocast=False, hf_api=False):
        x = embeds.clone().requires_grad_(True)
        model.gradient_checkpointing = checkpointing
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs_embeds=x).logits if hf_api else model(inputs_embeds=x)
        (logits.float() * weights).sum().backward()
        return x.grad

    want = grad(hf, hf_api=True)
    ours.train()
    assert rel_err(grad(ours), want) <= 1e-4
    assert rel_err(grad(ours, checkpointing=True), want) <= 1e-4
    bf16 = grad(ours, autocast=True)
    assert torch.isfinite(bf16).all() and F.cosine_similarity(bf16.flatten(), want.flatten(), dim=0) > 0.99


def test_gradient_checkpointing_gives_the_same_parameter_gradients(ckpt):
    ours = load_mamba(ckpt[1]["hf"]).train()
    ids = torch.randint(0, 104, (2, 12), generator=torch.Generator().manual_seed(7))
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = checkpointing
        F.cross_entropy(ours(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append(ours.backbone.layers[0].mixer.in_proj.weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def rewrite(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    state = load_file(file)
    edit(state)
    save_file(state, file)
    return file


def test_loud_key_errors(ckpt, tmp_path):
    src = ckpt[1]["hf"]
    key = "backbone.layers.1.mixer.x_proj.weight"
    rewrite(src, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(ValueError, match=f"missing.*does not fit MambaLM: missing keys \\(1\\): {key}"):
        load_mamba(str(tmp_path / "missing"))
    rewrite(src, tmp_path / "unexpected", lambda s: s.update({"backbone.layers.3.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): backbone\.layers\.3\.norm\.weight "
                                         r"\(in model\.safetensors\)"):
        load_mamba(str(tmp_path / "unexpected"))
    rewrite(src, tmp_path / "shape", lambda s: s.update({key: s[key][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=f"shape mismatches \\(1\\): {key}: file \\(18, 63\\) vs model \\(18, 64\\)"):
        load_mamba(str(tmp_path / "shape"))
    rewrite(src, tmp_path / "head", lambda s: s.update({"lm_head.weight": s["backbone.embeddings.weight"] + 1}))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from the embedding"):
        load_mamba(str(tmp_path / "head"))
    rewrite(src, tmp_path / "tied", lambda s: s.update({"lm_head.weight": s["backbone.embeddings.weight"].clone()}))
    load_mamba(str(tmp_path / "tied"))  # an equal head is accepted
    os.remove(os.path.join(tmp_path / "tied", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_mamba(str(tmp_path / "tied"))


def test_save_pretrained_loads_in_transformers(ckpt, tmp_path):
    ids = torch.randint(0, 104, (2, 9), generator=torch.Generator().manual_seed(8))
    loaded = load_mamba(ckpt[1]["original_bin"])
    torch.manual_seed(9)
    scratch = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=100, d_state=8))  # padded to 104
    for name, ours in (("loaded", loaded), ("scratch", scratch)):
        save_mamba(ours, str(tmp_path / name))
        hf = MambaForCausalLM.from_pretrained(str(tmp_path / name)).eval()
        assert set(hf.state_dict()) - {"lm_head.weight"} == set(ours.state_dict())
        with torch.no_grad():
            assert rel_err(ours(ids), hf(ids).logits) <= 1e-4
            again = load_mamba(str(tmp_path / name))
            assert torch.equal(again(ids), ours(ids))


def test_bf16_loading(ckpt):
    _, dirs = ckpt
    fp32 = load_mamba(dirs["hf_sharded"])
    bf16 = load_mamba(dirs["hf_sharded"], dtype=torch.bfloat16)
    mixer = bf16.backbone.layers[0].mixer
    assert bf16.backbone.embeddings.weight.dtype == mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32  # kept in fp32
    ids = torch.randint(0, 104, (2, 16), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want, got = fp32(ids), bf16(ids)
        assert got.dtype == torch.float32 and rel_err(got, want) < 0.05
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
        assert bf16.generate(ids, max_new_tokens=4).shape == (2, 4)


def test_2_8b_parameter_count_on_meta():
    cfg = MambaConfig()
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_state, cfg.d_inner, cfg.dt_rank, cfg.d_conv) == \
        (2560, 64, 50280, 16, 5120, 160, 4)
    assert MambaConfig(vocab_size=50277).vocab_size == 50280
    with torch.device("meta"):
        ours = MambaLM(cfg)
    d, e, n, r, k = 2560, 5120, 16, 160, 4
    per_layer = (d * 2 * e) + (e * k + e) + e * (r + 2 * n) + (r * e + e) + e * n + e + e * d + d
    expected = 50280 * d + 64 * per_layer + d
    assert sum(p.numel() for p in ours.parameters()) == expected == 2_768_345_600
    with torch.device("meta"):
        hf = MambaForCausalLM(HFMambaConfig(hidden_size=2560, num_hidden_layers=64, vocab_size=50280))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def test_from_scratch_init_follows_mamba_ssm():
    torch.manual_seed(11)
    cfg = MambaConfig(d_model=64, n_layer=4, vocab_size=50, d_state=16)
    model = MambaLM(cfg)
    for block in model.backbone.layers:
        m = block.mixer
        dt = F.softplus(m.dt_proj.bias.double())
        assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001 and dt.std() > 0.01
        assert torch.allclose(m.A_log, torch.arange(1, 17).float().log().expand(cfg.d_inner, -1))
        assert torch.equal(m.D, torch.ones(cfg.d_inner)) and torch.equal(block.norm.weight, torch.ones(64))
        assert m.dt_proj.weight.abs().max() <= cfg.dt_rank ** -0.5
        bound = 1 / math.sqrt(cfg.d_inner)  # PyTorch's default Linear bound, then / sqrt(n_layer)
        assert 0.8 * bound / 2 < m.out_proj.weight.abs().max() <= bound / math.sqrt(cfg.n_layer)
    assert abs(model.backbone.embeddings.weight.std().item() - 0.02) < 0.002


def test_process_logits_matches_transformers_processors():
    g = torch.Generator().manual_seed(12)
    logits = 3 * torch.randn(4, 60, generator=g)
    seen = torch.randint(0, 60, (4, 12), generator=g)
    for temperature, top_k, top_p, penalty in [(0.7, 10, 0.9, 1.3), (1.0, 0, 1.0, 1.1), (0.1, 500, 0.95, 1.1),
                                               (1.5, 5, 0.5, 1.0), (1.0, 0, 0.3, 1.0)]:
        want = logits.clone()
        if penalty != 1.0:
            want = RepetitionPenaltyLogitsProcessor(penalty)(seen, want)
        if temperature != 1.0:
            want = TemperatureLogitsWarper(temperature)(seen, want)
        if top_k:
            want = TopKLogitsWarper(top_k)(seen, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(seen, want)
        got = sampling.process_logits(logits, seen, temperature, top_k, top_p, penalty)
        kept = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), kept) and (~kept).any() == (top_k in (5, 10) or top_p < 1)
        torch.testing.assert_close(got[kept], want[kept])
        greedy = sampling.next_token(logits, seen, repetition_penalty=penalty)
        assert torch.equal(greedy, RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone()).argmax(-1))
        drawn = sampling.next_token(logits, seen, True, temperature, top_k, top_p, penalty,
                                    generator=torch.Generator().manual_seed(13))
        expect = torch.multinomial(want.softmax(-1), 1, generator=torch.Generator().manual_seed(13))[:, 0]
        assert torch.equal(drawn, expect)
    for temperature in (0.0, -0.5):  # transformers refuses these too; 0 would give nan, < 0 the least likely
        with pytest.raises(ValueError, match="temperature must be > 0"):
            sampling.next_token(logits, seen, True, temperature)


TEXTS = ["Hello, world!", "  two  spaces\nand a newline\ttab", "Ünïcödé — 日本語 🙂 ok",
         "the the the endoftext", "<|endoftext|>", ""]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A tiny byte-level BPE built like GPT-NeoX's (NFC, byte-level pre-tokenizer/decoder, <|endoftext|> = 0)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "audio language model"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def test_tokenizer_round_trip_and_matches_transformers(tokenizer_file):
    ours = MambaTokenizer(os.path.dirname(tokenizer_file))
    oracle = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, clean_up_tokenization_spaces=False)
    assert ours.eos_token_id == 0
    assert len(ours.encode("hello world")) < len("hello world")  # merges are used
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ids == oracle.encode(text) and ours.decode(ids) == oracle.decode(ids)
    assert ours.encode("<|endoftext|>") == [0] and ours.encode("hi")[0] != 0  # no BOS


def test_command_line(tokenizer_file, tmp_path, capsys):
    folder = str(tmp_path / "model")
    torch.manual_seed(14)
    save_mamba(MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=300, d_state=4)), folder)
    assert cli.main(["generate", "--model", folder, "--prompt", "hello"]) == 1
    assert "tokenizer.json" in capsys.readouterr().err
    shutil.copy(tokenizer_file, folder)
    argv = ["generate", "--model", folder, "--prompt", "hello world", "--greedy", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    model, tok = load_mamba(folder), MambaTokenizer(folder)
    new = model.generate(torch.tensor([tok.encode("hello world")]), max_new_tokens=6, repetition_penalty=1.1,
                         eos_token_id=0)[0].tolist()
    text = tok.decode(new[:new.index(0)] if 0 in new else new)
    assert len(text) > 0 and capsys.readouterr().out == "hello world" + text + "\n"
    os.remove(os.path.join(folder, "model.safetensors"))
    assert cli.main(["generate", "--model", folder, "--prompt", "hello"]) == 1
    assert "no weights" in capsys.readouterr().err


def test_command_line_makes_the_chosen_cuda_device_current(tmp_path, monkeypatch):
    """--device cuda:1 must become the current device before anything is loaded (Triton launches and CUDA graphs
    run on the current device, not on the tensors')."""
    calls = []

    class Stop(Exception):
        pass

    def set_device(device):
        calls.append(torch.device(device))
        raise Stop

    def load(*args, **kwargs):
        raise AssertionError("loaded before the device was made current")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(cli.weights, "LOADERS", {"mamba": load, "llama": load})
    monkeypatch.setattr(cli.checkpoint, "load_checkpoint", load)
    for argv in (["generate", "--model", str(tmp_path), "--prompt", "x"], ["ask", "--checkpoint", str(tmp_path),
                                                                          "clip.wav", "what?"]):
        with pytest.raises(Stop):
            cli.main(argv + ["--device", "cuda:1"])
    assert calls == [torch.device("cuda:1")] * 2
    cli.use_device("cpu")
    cli.use_device("cuda")  # no index: the current device stays
    assert len(calls) == 2


class EagerGraph:
    """Stands in for mamba._GraphedDecode on the CPU: the same buffers and binding, steps run eagerly."""
    recorded = []

    def __init__(self, model, cache, key):
        self.key, self.owner, self.model = key, None, model
        self.cache = mamba.MambaCache.allocate(model.config, cache.ssm.shape[1], cache.conv.dtype, cache.ssm.device)
        EagerGraph.recorded.append(key[:3])

    bind = mamba._GraphedDecode.bind

    def __call__(self, token):
        return self.model._step(token, self.cache)


def test_one_decode_graph_per_batch_size_is_kept_across_generations(ckpt, monkeypatch):
    ours = load_mamba(ckpt[1]["hf"])
    ids = torch.randint(1, 104, (2, 7), generator=torch.Generator().manual_seed(15))
    eager = [ours.generate(ids, max_new_tokens=8), ours.generate(ids[:1], max_new_tokens=8)]
    ours.cuda_graph = "require"
    with pytest.raises(RuntimeError, match="recording the decode step as a CUDA graph needs CUDA tensors"):
        ours.generate(ids, max_new_tokens=3)  # on the CPU: an error, not a silent fall-back to eager steps
    monkeypatch.setattr(mamba, "_GraphedDecode", EagerGraph)
    EagerGraph.recorded.clear()
    for _ in range(3):
        assert torch.equal(ours.generate(ids, max_new_tokens=8), eager[0])
        assert torch.equal(ours.generate(ids[:1], max_new_tokens=8), eager[1])
    assert [key[0] for key in EagerGraph.recorded] == [2, 1]  # recorded once per batch size, not per call
    with torch.no_grad():  # two generations of one batch size, interleaved: each keeps its own state
        (l1, c1), (l2, c2) = ours.prefill(ours.embed(ids)), ours.prefill(ours.embed(ids.flip(0)))
        for _ in range(3):
            t1, t2 = l1.argmax(-1), l2.argmax(-1)
            l1, l2 = ours.decode_step(t1, c1).clone(), ours.decode_step(t2, c2).clone()
        ours.cuda_graph = False
        (e1, d1), (e2, d2) = ours.prefill(ours.embed(ids)), ours.prefill(ours.embed(ids.flip(0)))
        for _ in range(3):
            e1, e2 = ours.decode_step(e1.argmax(-1), d1), ours.decode_step(e2.argmax(-1), d2)
        assert torch.equal(l1, e1) and torch.equal(l2, e2)
    ours.cuda_graph = "require"
    lora.add_lora(ours, ("in_proj",))  # new parameters: the recording is stale
    assert torch.equal(ours.generate(ids, max_new_tokens=8), eager[0])
    assert [key[0] for key in EagerGraph.recorded] == [2, 1, 2]
