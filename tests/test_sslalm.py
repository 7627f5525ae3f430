"""The model of Fig. 1: parameter counts of the paper, and tiny versions of the four variants end to end."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import audio
import checkpoint
import cli
import sampling
import sslalm
from tiny import base_llm as _base_llm, sslalm_config as _config

README = Path(__file__).resolve().parents[1] / "README.md"
BASE_LLM = {"mamba": 2_768_345_600, "llama": 6_738_415_616}  # Mamba-2.8B and Vicuna-7B (LLaMA-2-7B): published sizes

VARIANTS = [(size, llm) for size in ("small", "medium") for llm in ("mamba", "llama")]


# ---- the paper's counts (§III-C, §III-E), on the meta device ---------------------------------------------------
@pytest.mark.parametrize("size,llm,trainable_m,total_b,readme_row", [
    ("small", "llama", 42, 6.8, "| small hybrid"), ("medium", "llama", 61, 6.8, "| medium hybrid"),
    ("small", "mamba", 43, 2.8, "| small ssLALM"), ("medium", "mamba", 62, 2.8, "| medium ssLALM")])
def test_paper_parameter_counts(size, llm, trainable_m, total_b, readme_row, capsys):
    assert cli.main(["params", "--size", size, "--llm", llm, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["DASS"] == {"small": 29_884_463, "medium": 48_648_239}[size] - (768 * 527 + 527)  # no head
    assert row["conv"] == 768 * 768 * 9 + 768
    assert row["linear"] == 768 * {"llama": 4096, "mamba": 2560}[llm] + {"llama": 4096, "mamba": 2560}[llm]
    assert row["LoRA"] == {"llama": 4_194_304, "mamba": 6_553_600}[llm]
    model = sslalm.build_meta(size, llm)
    model.set_trainable(model.PARTS)  # counted as the optimiser sees them, and the frozen rest is the base LLM
    assert row["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row["total"] - row["trainable"] == row["LLM"] == BASE_LLM[llm]
    assert round(row["trainable"] / 1e6) == trainable_m  # the paper's numbers
    assert round(row["total"] / 1e9, 1) == total_b
    cells = next(line for line in README.read_text().splitlines() if line.startswith(readme_row)).split(" | ")[1:]
    assert cells[:6] == [f"{row[k]:,}" for k in ("DASS", "conv", "linear", "LoRA")] + \
        [f"{row['trainable'] / 1e6:.1f}M", f"{row['total'] / 1e9:.2f}B"], "README's parameter table"


# ---- tiny variants ---------------------------------------------------------------------------------------------


def _batch(model, n=2, frames=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    qa = [("What can you hear?", "A high pitched pure tone."), ("Is the pitch rising or falling?", "Falling.")]
    examples = []
    for i in range(n):
        ids, labels = model.encode_example(*qa[i % 2])
        examples.append({"fbank": torch.randn(frames, 128, generator=g), "input_ids": ids, "labels": labels})
    return sslalm.collate(examples, pad_id=model.tokenizer.eos_token_id)


@pytest.mark.parametrize("size,llm", VARIANTS)
def test_forward_backward_reaches_trainable_parts_only(bases, size, llm):
    model = checkpoint.build(_config(bases, size, llm))
    model.set_trainable(model.PARTS)
    batch = _batch(model)
    loss = model(**batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = {id(p) for part in model.PARTS for p in model.part_parameters(part)}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, f"frozen LLM weight {name} got a gradient"
    lora_b = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad.abs().sum() > 0 for p in lora_b)  # B = 0 at init, so only B moves first
    assert all(p.grad.abs().sum() > 0 for p in model.part_parameters("projector"))
    dead = [n for n, p in model.dass.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead, f"DASS parameters without gradient: {dead}"


def test_stage_one_trains_the_projector_only(bases):
    model = checkpoint.build(_config(bases, "small", "mamba"))
    model.set_trainable({"projector"})
    model(**_batch(model)).backward()
    assert all(p.grad is not None for p in model.part_parameters("projector"))
    assert all(p.grad is None for part in ("dass", "lora") for p in model.part_parameters(part))


def test_audio_tokens_follow_the_duration(bases):
    model = checkpoint.build(_config(bases, "small", "mamba"))
    for frames, tokens in ((1024, 32), (2048, 64), (100, 4), (1, 2)):
        out = model.audio_tokens(torch.randn(1, frames, 128))
        assert out.shape == (1, tokens, model.llm.hidden_size), frames


def test_answering_pads_short_clips_and_keeps_or_crops_long_ones(bases):
    model = checkpoint.build(_config(bases, "small", "mamba"))  # trained length: 128 frames
    short = torch.randn(40, 128)
    padded = model.prepare_audio(short)
    assert padded.shape == (128, 128) and torch.equal(padded[:40], short)
    assert torch.all(padded[40:] == audio.SILENT_FRAME)  # the value collate pads training batches with
    wave = torch.randn(16000 * 3)  # 3 s: 298 frames
    assert torch.equal(model.prepare_audio(wave), audio.dass_input(wave, target_length=None))
    assert torch.equal(model.prepare_audio(wave, crop=True), audio.dass_input(wave, target_length=128))
    tiny = torch.randn(4000)  # 0.25 s: padded to the trained length as the training data was
    assert torch.allclose(model.prepare_audio(tiny), audio.dass_input(tiny, target_length=128), atol=1e-6)
    with pytest.raises(ValueError, match="DASS input"):
        model.prepare_audio(torch.randn(2, 16000))


def test_long_instructions_keep_the_response_marker(bases):
    model = checkpoint.build(_config(bases, "small", "mamba"))
    prompt = model.encode_prompt("Describe every sound you hear, in order. " * 20)
    assert len(prompt) > model.config.text_cutoff
    assert model.tokenizer.decode(prompt).endswith("### Response:\n")


@pytest.mark.parametrize("llm", ["mamba", "llama"])
def test_overfitting_one_batch_drives_the_loss_near_zero(bases, llm):
    """DASS, the projector and the adapters memorise two examples through the frozen LLM. A random frozen LLaMA
    adapted on q/k alone cannot express arbitrary text (it can only re-weight frozen values), so the LLaMA case
    also adapts v/o here; the paper's q/k targets are exercised by every other test. It runs in a fresh process on
    one thread: inside the full suite on a busy 2-core machine its backward pass was tens of times slower."""
    here = Path(__file__).parent
    code = f"import json, tiny; print(json.dumps(tiny.overfit({json.dumps(bases)!r}, {llm!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{here}:{here.parent}"})
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = json.loads(out.stdout.strip().splitlines()[-1])
    assert first > 2.0 and last < 0.1, (first, last)


def _generate_without_cache(model, clip, instruction, max_new_tokens):
    """Greedy decoding by re-running the whole sequence at every step: no cache, no padding."""
    prompt = model.encode_prompt(instruction)
    prefix = torch.cat([model.audio_tokens(model.prepare_audio(clip)[None]),
                        model.llm.embed(torch.tensor([prompt]))], dim=1)
    out = []
    for _ in range(max_new_tokens):
        embeds = torch.cat([prefix, model.llm.embed(torch.tensor([out], dtype=torch.long))], dim=1)
        logits = model.llm(inputs_embeds=embeds)[:, -1]
        token = sampling.next_token(logits, torch.tensor([prompt + out]), repetition_penalty=1.1).item()
        out.append(token)
        if token == model.tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize("llm", ["mamba", "llama"])
def test_generation_with_the_decode_cache_equals_generation_without(bases, llm):
    torch.manual_seed(0)
    model = checkpoint.build(_config(bases, "small", llm)).eval()
    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(128, 128, generator=g), torch.randn(300, 128, generator=g)]  # 8 and 10 audio tokens
    questions = ["What can you hear?", "Write an audio caption describing the sound."]
    cached = model.generate(clips, questions, greedy=True, max_new_tokens=12)
    for clip, question, row in zip(clips, questions, cached):
        expected = _generate_without_cache(model, clip, question, 12)
        eos = model.tokenizer.eos_token_id
        assert row[:len(expected)] == expected and all(t == eos for t in row[len(expected):])


def test_a_finished_row_gets_the_pad_token_until_every_row_has_finished():
    class Count:  # a stub language model: the next token is the last one + 1
        def embed(self, ids):
            return torch.nn.functional.one_hot(ids, 8).float()

        def prefill(self, embeds, attention_mask, max_length):
            return self.decode_step(embeds[:, -1].argmax(dim=-1), None), None

        def decode_step(self, token, cache):
            return torch.nn.functional.one_hot((token + 1) % 8, 8).float()

    ids = torch.tensor([[1, 2], [3, 4]])
    assert sampling.generate(Count(), ids, max_new_tokens=6, eos_token_id=6).tolist() == [[3, 4, 5, 6], [5, 6, 6, 6]]
    padded = sampling.generate(Count(), ids, max_new_tokens=6, eos_token_id=6, pad_token_id=0)  # as transformers'
    assert padded.tolist() == [[3, 4, 5, 6], [5, 6, 0, 0]]


def test_checkpoint_round_trip_recreates_the_trained_model(bases, tmp_path):
    torch.manual_seed(0)
    model = checkpoint.build(_config(bases, "small", "llama"))
    model.set_trainable(model.PARTS)
    batch = _batch(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(**batch).backward()
        opt.step()
    model.eval()
    checkpoint.save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["sslalm"]["llm_weights"] == bases["llama"]
    again = checkpoint.load_checkpoint(tmp_path / "ckpt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    with torch.no_grad():
        assert model(**batch).item() == again(**batch).item()
    clip = [torch.randn(128, 128)]
    assert model.generate(clip, ["What can you hear?"], greedy=True, max_new_tokens=5) == \
        again.generate(clip, ["What can you hear?"], greedy=True, max_new_tokens=5)


def test_mismatched_checkpoints_are_refused(bases, tmp_path):
    model = checkpoint.build(_config(bases, "small", "mamba"))
    checkpoint.save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())

    meta["sslalm"]["lora_r"] = 4  # another adapter shape
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shape mismatches .*lora_A\.weight: file \(8, 32\) vs model \(4, 32\)"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")

    meta["sslalm"]["lora_r"] = 8  # another base LLM of the same shape
    meta["sslalm"]["llm_weights"] = _base_llm("mamba", tmp_path / "other", seed=5)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not those"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")

    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_checkpoints_survive_moving_the_base_weights(bases, tmp_path):
    torch.manual_seed(0)
    model = checkpoint.build(replace(_config(bases, "small", "mamba"),
                                        llm_weights=str(shutil.copytree(bases["mamba"], tmp_path / "base"))))
    checkpoint.save_checkpoint(model, tmp_path / "ckpt")  # the base lies outside the checkpoint: named by absolute path
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["sslalm"]["llm_weights"] == \
        str((tmp_path / "base").resolve())
    (tmp_path / "base").rename(tmp_path / "moved_base")
    with pytest.raises(FileNotFoundError, match="base"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")
    again = checkpoint.load_checkpoint(tmp_path / "ckpt", llm_weights=str(tmp_path / "moved_base"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not those"):  # the override must be the same base weights
        checkpoint.load_checkpoint(tmp_path / "ckpt", llm_weights=_base_llm("mamba", tmp_path / "other", seed=5))

    run = tmp_path / "run"  # a base inside the checkpoint folder is named relative to it: the folder can move
    model = checkpoint.build(replace(_config(bases, "small", "mamba"),
                                        llm_weights=str(shutil.copytree(bases["mamba"], run / "llm"))))
    checkpoint.save_checkpoint(model, run)
    assert json.loads((run / "config.json").read_text())["sslalm"]["llm_weights"] == "llm"
    run.rename(tmp_path / "run_moved")
    again = checkpoint.load_checkpoint(tmp_path / "run_moved")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_missing_weights_say_what_to_download(bases, tmp_path):
    with pytest.raises(FileNotFoundError, match="state-spaces/mamba-2.8b-hf"):
        checkpoint.build(sslalm.SSLALMConfig.paper("small", "mamba", dass_weights=bases["small"]))
    with pytest.raises(FileNotFoundError, match="vicuna-7b"):
        checkpoint.build(sslalm.SSLALMConfig.paper("small", "llama", llm_weights=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="DASS_small.pth"):
        checkpoint.build(sslalm.SSLALMConfig.paper("small", "mamba", llm_weights=bases["mamba"],
                                                   dass_weights=str(tmp_path / "DASS_small.pth")))


def test_wrong_shapes_give_clear_errors(bases):
    model = checkpoint.build(_config(bases, "small", "mamba"))
    with pytest.raises(ValueError, match="128"):
        model.audio_tokens(torch.randn(1, 100, 64))
    with pytest.raises(ValueError, match="waveform"):
        model.prepare_audio(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2 clips and 1 instructions"):
        model.answer([torch.randn(16000), torch.randn(16000)], ["What can you hear?"])


def test_prompt_cutoff_eos_and_response_only_labels(bases):
    model = checkpoint.build(_config(bases, "small", "llama"))
    ids, labels = model.encode_example("What can you hear?", "A tone.")
    assert ids[0] == model.tokenizer.bos_token_id and ids[-1] == model.tokenizer.eos_token_id
    assert labels == ids
    assert model.tokenizer.decode(ids) == sslalm.PROMPT_TEMPLATE.format(instruction="What can you hear?") + "A tone."
    long_ids, _ = model.encode_example("What can you hear? " * 40, "A tone.")
    assert len(long_ids) == 108 and long_ids[-1] != model.tokenizer.eos_token_id  # cut, and no EOS, as LTU
    model.config.response_only_loss = True
    ids, labels = model.encode_example("What can you hear?", "A tone.")
    prompt = model.encode_prompt("What can you hear?")
    assert labels[:len(prompt)] == [sslalm.IGNORE_INDEX] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]


@pytest.mark.parametrize("llm", ["mamba", "llama"])
def test_a_checkpoint_trained_on_an_fp32_base_loads_on_a_bf16_or_fp16_base(bases, tmp_path, llm):
    """CPU runs and the demo train with the base in fp32; evaluation and `ask` load it in bf16 on a GPU."""
    model = checkpoint.build(_config(bases, "small", llm))
    checkpoint.save_checkpoint(model, tmp_path / "ckpt")
    fp32 = checkpoint.llm_fingerprint(model.llm)
    assert "model.norm.weight" in fp32 or "backbone.norm_f.weight" in fp32
    for dtype in (torch.bfloat16, torch.float16):
        again = checkpoint.load_checkpoint(tmp_path / "ckpt", dtype=dtype)
        assert again.llm.embed(torch.tensor([[1]])).dtype == dtype
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.trainable_state_dict().items())
        found = checkpoint.llm_fingerprint(again.llm)
        assert (found == fp32) == (dtype == torch.bfloat16)  # fp16 rounds some samples differently ...
        assert checkpoint.fingerprint_mismatch(fp32, found) is None  # ... within one bf16 step


@pytest.mark.parametrize("llm,keys", [
    ("mamba", ["backbone.layers.1.mixer.out_proj.weight", "backbone.layers.1.mixer.A_log", "backbone.norm_f.weight"]),
    ("llama", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"])])
def test_a_base_whose_last_block_or_head_differs_is_refused(bases, tmp_path, llm, keys):
    checkpoint.save_checkpoint(checkpoint.build(_config(bases, "small", llm)), tmp_path / "ckpt")
    for key in keys:
        folder = shutil.copytree(bases[llm], tmp_path / key)
        state = load_file(folder / "model.safetensors")
        state[key] = state[key] * 1.05
        save_file(state, folder / "model.safetensors")
        with pytest.raises(ValueError, match=f"not those .* was trained on \\({key} differs\\)"):
            checkpoint.load_checkpoint(tmp_path / "ckpt", llm_weights=str(folder))


def test_ask_answers_from_a_checkpoint(bases, tmp_path, capsys):
    torch.manual_seed(0)
    model = checkpoint.build(_config(bases, "small", "mamba")).eval()
    checkpoint.save_checkpoint(model, tmp_path / "ckpt")
    wave = 0.1 * torch.sin(torch.arange(16000 * 2) * (2 * torch.pi * 440 / 16000))  # 2 s of a 440 Hz tone
    sf.write(tmp_path / "tone.wav", wave.numpy(), 16000)
    argv = ["ask", "--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "tone.wav"), "What", "can", "you", "hear?",
            "--greedy", "--max-new-tokens", "6", "--device", "cpu"]
    assert cli.main(argv) == 0
    want = model.answer([str(tmp_path / "tone.wav")], ["What can you hear?"], greedy=True, max_new_tokens=6)[0]
    assert capsys.readouterr().out == want + "\n"
    assert cli.main(argv[:2] + [str(tmp_path / "nowhere")] + argv[3:]) == 1
    assert "is not an ssLALM checkpoint" in capsys.readouterr().err
