"""lora.py: adapters on llama.py / mamba.py models, checked against PEFT on top of transformers."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM, MambaConfig, MambaForCausalLM

import checkpoint
import llama
import lora
import mamba
from weights import load_llama, load_mamba

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random transformers LLaMA saved with save_pretrained; returns (directory, transformers model)."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return str(path), hf


def ids(seed=1, shape=(2, 11)):
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def randomise_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_unchanged_at_init_and_only_adapters_train(base):
    path, _ = base
    model = load_llama(path)
    x = ids()
    with torch.no_grad():
        before = model(x)
    names = lora.add_lora(model, lora.PAPER_TARGETS["llama"], **lora.PAPER_LORA)
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk"]
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: the adapted model is the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert sum(p.numel() for p in lora.lora_parameters(model)) == 2 * 8 * ((64 + 64) + (64 + 32))  # q 64->64, k 64->32

    model.train()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    for n, p in model.named_parameters():
        if n.endswith("lora_B.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif n.endswith("lora_A.weight"):  # dL/dA = (α/r) Bᵀ (...) is 0 while B is 0
            assert p.grad is not None and not p.grad.any(), n
        else:
            assert p.grad is None, n
    model.zero_grad()
    randomise_b(model)
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.lora_parameters(model))


def test_targets_are_checked(base):
    path, _ = base
    model = load_llama(path)
    with pytest.raises(ValueError, match="no module"):
        lora.add_lora(model, ("query",))
    with pytest.raises(TypeError, match="mlp.*not nn.Linear"):
        lora.add_lora(model, ("mlp",))
    lora.add_lora(model, ("self_attn.q_proj",))  # a dotted suffix, as in PEFT
    assert len(lora.lora_modules(model)) == 2
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(model, ("q_proj",))


def train_adapters(model, steps=5):
    """A few AdamW steps on the adapters (dropout on), so that A and B are no longer at their initial values."""
    model.train()
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    x = ids(seed=3, shape=(4, 12))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_merge_equals_unmerged(base):
    path, _ = base
    model = load_llama(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model)
    train_adapters(model)
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        assert rel_err(unmerged, load_llama(path)(x)) > 1e-3  # the adapters do something
        assert lora.merge_lora(model) == 4 and lora.merge_lora(model) == 0
        assert rel_err(model(x), unmerged) <= 1e-5
        q = model.model.layers[0].self_attn.q_proj
        assert not torch.equal(q.weight, base["model.layers.0.self_attn.q_proj.weight"])
        assert lora.unmerge_lora(model) == 4
        assert rel_err(model(x), unmerged) <= 1e-5
        assert torch.allclose(q.weight, base["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)
        # generation with merged adapters = generation with the adapter path
        want = model.generate(x[:1], max_new_tokens=10)
        lora.merge_lora(model)
        assert torch.equal(model.generate(x[:1], max_new_tokens=10), want)


def test_bf16_base_fp32_adapters():
    torch.manual_seed(4)
    base = torch.nn.Linear(32, 48).to(torch.bfloat16)
    layer = torch.nn.Sequential(base)
    lora.add_lora(layer, ("0",), r=4, alpha=8, dropout=0.0)
    wrapped = layer[0]
    assert wrapped.weight is base.weight and wrapped.lora_A.weight.dtype == torch.float32
    randomise_b(layer)
    x = torch.randn(3, 32)
    want = torch.nn.functional.linear(x, wrapped.weight.float() + wrapped.delta_weight(), wrapped.bias.float())
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2


def test_paper_adapter_counts():
    with torch.device("meta"):
        vicuna = llama.LlamaLM(llama.LlamaConfig())
        ssm = mamba.MambaLM(mamba.MambaConfig())
    assert len(lora.add_lora(vicuna, lora.PAPER_TARGETS["llama"], **lora.PAPER_LORA)) == 64
    assert sum(p.numel() for p in vicuna.parameters() if p.requires_grad) == 4_194_304
    assert len(lora.add_lora(ssm, lora.PAPER_TARGETS["mamba"], **lora.PAPER_LORA)) == 64
    assert sum(p.numel() for p in ssm.parameters() if p.requires_grad) == 6_553_600


def test_save_load_round_trip(base, tmp_path):
    path, _ = base
    model = load_llama(path)
    lora.add_lora(model)
    randomise_b(model)
    checkpoint.save_lora(model, tmp_path / "adapters.safetensors")
    other = load_llama(path)
    lora.add_lora(other)
    checkpoint.load_lora(other, tmp_path / "adapters.safetensors")
    for k, v in lora.lora_state_dict(model).items():
        assert torch.equal(lora.lora_state_dict(other)[k], v), k
    with torch.no_grad():
        assert torch.equal(other(ids()), model(ids()))
    # loud checks: other hyper-parameters, other targets
    wrong_r = load_llama(path)
    lora.add_lora(wrong_r, r=4)
    with pytest.raises(ValueError, match="r=8.*r=4"):
        checkpoint.load_lora(wrong_r, tmp_path / "adapters.safetensors")
    wrong_targets = load_llama(path)
    lora.add_lora(wrong_targets, ("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"adapters\.safetensors does not fit LlamaLM: missing keys \(4\): .*v_proj.*"
                                         r"unexpected keys \(4\): .*k_proj"):
        checkpoint.load_lora(wrong_targets, tmp_path / "adapters.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        checkpoint.save_lora(load_llama(path), tmp_path / "none.safetensors")
    lora.merge_lora(other)  # loading into merged weights would leave the old update in them
    with pytest.raises(ValueError, match="merged into the weights; call unmerge_lora"):
        checkpoint.load_lora(other, tmp_path / "adapters.safetensors")


def test_export_loads_in_peft(base, tmp_path):
    path, _ = base
    model = load_llama(path)
    lora.add_lora(model, lora.PAPER_TARGETS["llama"], **lora.PAPER_LORA)
    train_adapters(model)
    checkpoint.export_peft(model, tmp_path, base_model_name_or_path=path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.05)
    assert cfg["target_modules"] == ["k_proj", "q_proj"]
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path).eval()
    assert peft_model.peft_config["default"].r == 8
    x = ids(seed=5)
    with torch.no_grad():
        want = peft_model(x).logits
        assert rel_err(model(x), want) <= 1e-5
        assert rel_err(want, LlamaForCausalLM.from_pretrained(path)(x).logits) > 1e-3  # the adapters were applied


def test_import_from_peft(base, tmp_path):
    path, _ = base
    torch.manual_seed(6)
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a non-trivial adapter
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path), config).eval()
    peft_model.save_pretrained(tmp_path)
    model = load_llama(path)
    names = checkpoint.import_peft(model, tmp_path)
    assert len(names) == 6 and all(m.scaling == 3.0 for m in lora.lora_modules(model).values())
    x = ids(seed=7)
    with torch.no_grad():
        assert rel_err(model(x), peft_model(x).logits) <= 1e-5
    # the older adapter_model.bin form of the same adapter
    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    from_bin = load_llama(path)
    checkpoint.import_peft(from_bin, tmp_path)
    with torch.no_grad():
        assert torch.equal(from_bin(x), model(x))
    # a model that already has adapters of another rank is refused
    with pytest.raises(ValueError, match="r=4"):
        other = load_llama(path)
        lora.add_lora(other, ("q_proj", "v_proj", "down_proj"), r=8, alpha=12)
        checkpoint.import_peft(other, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        checkpoint.import_peft(load_llama(path), tmp_path)


def test_mamba_export_loads_in_peft(tmp_path):
    """The Mamba target (in_proj) under PEFT's names: backbone.layers.{i}.mixer.in_proj."""
    torch.manual_seed(8)
    hf = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4))
    hf.save_pretrained(tmp_path / "base")
    model = load_mamba(str(tmp_path / "base"))
    names = lora.add_lora(model, lora.PAPER_TARGETS["mamba"], **lora.PAPER_LORA)
    assert names == ["backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj"]
    randomise_b(model)
    checkpoint.export_peft(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(MambaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = peft_model.eval()(x).logits
        assert rel_err(model(x), want) <= 1e-4
        assert rel_err(want, MambaForCausalLM.from_pretrained(tmp_path / "base")(x).logits) > 1e-3
