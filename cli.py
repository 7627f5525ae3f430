"""The command line of the models: `ask` a trained ssLALM about a clip, count the `params` of Fig. 1's parts,
`generate` text with a base LLM folder (Mamba or LLaMA), `tag` a clip with DASS.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import audio
import checkpoint
import data
import sampling
import weights
from sslalm import build_meta, parameter_table

SAMPLING_FLAGS = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}  # generate's


def use_device(name: str) -> torch.device:
    """torch.device(name); cuda:N becomes the current CUDA device first (Triton kernels and CUDA graphs run there)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def ask(args) -> None:
    dtype = torch.bfloat16 if args.device.type == "cuda" else None
    model = checkpoint.load_checkpoint(args.checkpoint, device=args.device, dtype=dtype, llm_weights=args.llm_weights)
    print(model.answer([args.clip], [" ".join(args.question)], greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                       generator=torch.Generator(args.device).manual_seed(args.seed))[0])


def params(args) -> None:
    table = parameter_table(build_meta(args.size, args.llm))
    counts = {**table["parts"], "trainable": table["trainable"], "total": table["total"]}
    if args.json:
        print(json.dumps({"size": args.size, "llm": args.llm, **counts}))
        return
    for name, n in counts.items():
        print(f"{name:>9}: {n:>13,}  ({n / 1e6:,.1f}M)")


def generate(args) -> None:
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    kind = weights.llm_kind(args.model)
    tokenizer = weights.TOKENIZERS[kind](args.model)
    model = weights.LOADERS[kind](args.model, dtype=dtype, device=args.device)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty")
    new = model.generate(torch.tensor([prompt], device=args.device), max_new_tokens=args.max_new_tokens,
                         do_sample=not args.greedy, eos_token_id=tokenizer.eos_token_id,
                         generator=torch.Generator(args.device).manual_seed(args.seed),
                         **{name: getattr(args, name) for name in SAMPLING_FLAGS})[0].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    print(tokenizer.decode(prompt + new))  # decoded whole: LLaMA's pieces carry the space before a word


def tag(args) -> None:
    model = weights.load_dass(args.weights).to(args.device).eval()
    labels = data.read_labels(args.labels) if args.labels else [f"class {i}" for i in range(model.config.n_classes)]
    if len(labels) != model.config.n_classes:
        raise ValueError(f"{args.labels} has {len(labels)} labels; DASS has {model.config.n_classes} classes")
    x = audio.dass_input_from_file(args.audio, target_length=None)  # (T, 128), a short clip padded with silence
    x = F.pad(x, (0, 0, 0, max(0, audio.DASS_FRAMES - len(x))), value=audio.SILENT_FRAME)
    with torch.no_grad():
        scores = torch.sigmoid(model(x[None].to(args.device)))[0].float().cpu()  # multi-label: independent sigmoids
    for s, i in zip(*scores.topk(min(args.top, len(labels)))):
        print(f"{s.item():.3f}  {labels[i]}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="The ssLALM's models from the command line.")
    sub = ap.add_subparsers(dest="command", required=True)
    p_ask = sub.add_parser("ask", help="answer a question about a clip with a trained checkpoint")
    p_ask.add_argument("--checkpoint", required=True, help="a folder written by train.py")
    p_ask.add_argument("clip", help="an audio file (any length; resampled to 16 kHz)")
    p_ask.add_argument("question", nargs="+", help="the question (e.g. 'What can you hear?')")
    p_ask.add_argument("--llm-weights", help="the base LLM's folder, if it has moved since training")
    p = sub.add_parser("params", help="trainable and total parameters per part, as in the paper (§III-E)")
    p.add_argument("--size", choices=("small", "medium"), default="small")
    p.add_argument("--llm", choices=("mamba", "llama"), default="mamba")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p_gen = sub.add_parser("generate", help="continue a text prompt with a Mamba or LLaMA checkpoint folder")
    p_gen.add_argument("--model", required=True, help="folder with config.json, the weights and the tokenizer")
    p_gen.add_argument("--prompt", required=True)
    for name, kind in SAMPLING_FLAGS.items():
        p_gen.add_argument("--" + name.replace("_", "-"), type=kind, default=sampling.PAPER_SAMPLING[name])
    p_tag = sub.add_parser("tag", help="the top AudioSet labels of a clip, by DASS")
    p_tag.add_argument("audio", help="audio file (any format and sample rate soundfile reads)")
    p_tag.add_argument("--weights", required=True, help="DASS_small.pth / DASS_medium.pth, ours, or the HF port")
    p_tag.add_argument("--labels", help="class_labels_indices.csv (index,mid,display_name); default: class indices")
    p_tag.add_argument("--top", type=int, default=5)
    for p, max_new_tokens in ((p_ask, sampling.MAX_NEW_TOKENS), (p_gen, 100)):
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        p.add_argument("--greedy", action="store_true", help="argmax decoding instead of the paper's sampling")
        p.add_argument("--seed", type=int, default=0)
    for p in (p_ask, p_gen, p_tag):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if "device" in args:
            args.device = use_device(args.device)  # before anything is loaded
        {"ask": ask, "params": params, "generate": generate, "tag": tag}[args.command](args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
