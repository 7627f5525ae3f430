"""Tiny stand-ins for the pretrained parts, written in the real formats: an LLM folder (HF weights + tokenizer)
and DASS safetensors. Shared by the tests of sslalm.py and evaluate.py (fixture `bases` in conftest.py)."""
import json

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import checkpoint
import sslalm
import weights
from dass import DASS, DASSConfig
from llama import LlamaConfig, LlamaLM
from mamba import MambaConfig, MambaLM

CORPUS = [
    "### Instruction:\nWhat can you hear?\n\n### Response:\nA high pitched pure tone.",
    "### Instruction:\nWrite an audio caption describing the sound.\n\n### Response:\nWhite noise, loud and steady.",
    "### Instruction:\nIs the pitch rising or falling?\n\n### Response:\nThe pitch is rising quickly.",
    "a low hum, a click train, brown noise, silence, a chirp, an amplitude modulated tone",
]
TINY_DASS = {"small": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
             "medium": dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))}


def mamba_tokenizer(folder):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def llama_tokenizer(folder):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False)  # as LLaMA's: newlines survive
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()


def base_llm(llm, folder, seed=0):
    """A tiny random LLM saved in the HF format with its tokenizer: stands in for Mamba-2.8B / Vicuna-7B."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if llm == "mamba":
        vocab = mamba_tokenizer(folder)
        model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, d_state=4))
    else:
        vocab = llama_tokenizer(folder)
        model = LlamaLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, vocab_size=vocab))
    with torch.no_grad():  # a pretrained LM predicts confidently; std-0.02 output embeddings could not
        (model.backbone.embeddings if llm == "mamba" else model.lm_head).weight.normal_(0, 0.5)
    (weights.save_mamba if llm == "mamba" else weights.save_llama)(model, str(folder))
    return str(folder)


def sslalm_config(bases, size, llm, **kw):
    """An SSLALMConfig on the tiny parts of the `bases` fixture; short clips (128 frames, 8 audio tokens)."""
    return sslalm.SSLALMConfig(size="custom", llm=llm, dass=TINY_DASS[size], llm_weights=bases[llm],
                               dass_weights=bases[size], audio_frames=128, **kw)


def tiny_dass(size, folder, seed=1):
    torch.manual_seed(seed)
    weights.save_dass(DASS(DASSConfig(**TINY_DASS[size])), folder / f"dass_{size}.safetensors")
    return str(folder / f"dass_{size}.safetensors")


def overfit(bases_json, llm, steps=250):
    """Train the trainable parts on one batch of two examples; returns (first loss, last loss)."""
    bases = json.loads(bases_json)
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    torch.manual_seed(0)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj") if llm == "llama" else ()
    model = checkpoint.build(sslalm_config(bases, "small", llm, lora_dropout=0.0, lora_targets=targets))
    model.set_trainable(model.PARTS)
    g = torch.Generator().manual_seed(0)
    qa = [("What can you hear?", "A high pitched pure tone."), ("Is the pitch rising or falling?", "Falling.")]
    examples = []
    for q, a in qa:
        ids, labels = model.encode_example(q, a)
        examples.append({"fbank": torch.randn(64, 128, generator=g), "input_ids": ids, "labels": labels})
    batch = sslalm.collate(examples, pad_id=model.tokenizer.eos_token_id)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[150], gamma=0.1)
    losses = []
    for _ in range(steps):
        loss = model(**batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return losses[0], losses[-1]
