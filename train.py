"""Train LTU's four-stage recipe (paper §III-E, trainer.STAGES) on OpenAQA-format data; data-parallel and resumable.

    python train.py --size small --llm mamba        # the four stages in turn, on the default layout (layout.py)
    python train.py ... --stage 2 --data stage2.json --init-from runs/stage1 --output-dir runs/stage2
    torchrun --nproc_per_node 8 train.py ...        # the same training, data-parallel over 8 GPUs
    python train.py ... --resume                    # continue the run in --output-dir exactly where it stopped
    python train.py --demo --output-dir demo        # CPU, minutes: synthetic sounds -> a tiny ssLALM (demo.py)
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

import checkpoint
import demo
import layout
import sslalm
from data import BadEntry, DataError, OpenAQADataset, at_least, load_openaqa, parse_prefixes
from trainer import (STAGES, NonFiniteLoss, TrainConfig, TrainResult, claim_output, count_parameters,
                     init_distributed, list_checkpoints, rank_world, train)


def run_stage(args: argparse.Namespace) -> TrainResult:
    """One stage of the recipe, from the previous stage's output (--init-from) or the pretrained parts; the final
    model in --output-dir."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's worker processes tokenize
    local_rank, out, say = init_distributed(), Path(args.output_dir), layout.say
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.index is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # kernels, CUDA graphs and streams on the chosen GPU
    entries = load_openaqa(args.data)                          # malformed data fails before any model is built
    claim_output(out, args.resume, args.overwrite)              # and a folder holding another run, too
    dtype = torch.bfloat16 if device.type == "cuda" else None  # the frozen LLM in bf16 on GPU; trained parts fp32
    if args.init_from:
        say(f"stage {args.stage}: starting from {args.init_from} (its config names the base weights)")
        model = checkpoint.load_checkpoint(args.init_from, device=device, dtype=dtype, llm_weights=args.llm_weights,
                                           tokenizer=args.tokenizer)
    else:
        if args.stage > 1:
            say(f"note: stage {args.stage} without --init-from starts from a new projector and new LoRA adapters")
        config = sslalm.SSLALMConfig.paper(args.size, args.llm, dass_weights=args.dass_weights,
                                           llm_weights=args.llm_weights, tokenizer=args.tokenizer,
                                           audio_frames=args.audio_frames)
        model = checkpoint.build(config, device=device, dtype=dtype)
    cfg = TrainConfig.for_stage(args.stage, **{k: v for k, v in vars(args).items() if k in TrainConfig.__annotations__})
    model.set_trainable(cfg.trainable)
    model.llm.gradient_checkpointing = args.grad_checkpointing
    trained = count_parameters(p for p in model.parameters() if p.requires_grad)
    say(f"stage {args.stage}: trains {' + '.join(cfg.trainable)} ({trained:,} of "
        f"{sslalm.parameter_table(model)['total']:,} parameters), lr {cfg.lr:g}, {cfg.epochs} epoch(s), batch "
        f"{cfg.batch_size} = {rank_world()[1]} process(es) x micro-batch {cfg.micro_batch} x accumulation, "
        f"{len(entries):,} entries from {args.data}")
    roots = [r for r in (args.audio_root, Path(args.data).resolve().parent) if r]
    ds = OpenAQADataset(entries, model.encode_example, roots, parse_prefixes(args.audio_prefix),
                        model.config.audio_frames, source=args.data)
    dropped = ds.check_files(args.skip_bad)
    if model.config.response_only_loss:  # otherwise the prompt's own tokens are labelled: no entry lacks labels
        dropped += ds.check_labels(args.skip_bad)
    res = train(model, ds, sslalm.collate, model.tokenizer.eos_token_id, cfg, out, resume=args.resume,  # EOS pads
                overwrite=args.overwrite, device=device)
    res.bad = dropped + res.bad
    if rank_world()[0] == 0:
        checkpoint.save_checkpoint(model, out)
        report_bad(res.bad)
        say(f"done: {res.steps} steps; the model is in {out} (config.json + model.safetensors)")
    return res


def report_bad(bad: list[BadEntry], limit: int = 20) -> None:
    """The end-of-run report of --skip-bad: how many entries were skipped, and which."""
    if bad:
        print(f"skipped {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} (--skip-bad):", file=sys.stderr)
    for b in sorted(bad, key=lambda b: b.index)[:limit]:
        print(f"  {b}", file=sys.stderr)
    if len(bad) > limit:
        print(f"  ... and {len(bad) - limit} more", file=sys.stderr)


def curriculum_stage(args: argparse.Namespace, stage: int, out: Path, init_from: Path | None) -> TrainResult:
    """One unfinished stage of the curriculum (layout.run_curriculum): resumed from its newest readable checkpoint
    if it has one, else started afresh (what a run stopped before its first checkpoint left there is deleted)."""
    resume = "latest" if list_checkpoints(out) else None
    return run_stage(argparse.Namespace(**{
        **vars(args), "stage": stage, "output_dir": str(out), "data": str(layout.stage_file(args.data_dir, stage)),
        "init_from": str(init_from) if init_from else None, "resume": resume, "overwrite": resume is None}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", action="store_true", help="synthetic sounds -> a tiny ssLALM on CPU in minutes")
    p.add_argument("--output-dir", help="default: runs/SIZE-LLM/stageN (without --stage: runs/SIZE-LLM; --demo: demo)")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument("--size", choices=("small", "medium"), default="small", help="DASS size")
    m.add_argument("--llm", choices=("mamba", "llama"), default="mamba", help="mamba: ssLALM; llama: hybrid LALM")
    m.add_argument("--dass-weights", help="DASS checkpoint (DASS_small.pth / DASS_medium.pth)")
    m.add_argument("--llm-weights", help="folder of the LLM (state-spaces/mamba-2.8b-hf or lmsys/vicuna-7b-v1.5)")
    m.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model (default: in --llm-weights)")
    m.add_argument("--init-from", help="the previous stage's output dir (its config names the base weights)")
    m.add_argument("--audio-frames", type=at_least(1), default=sslalm.SSLALMConfig.audio_frames, help="fbank frames")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM blocks in backward")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="the stage's OpenAQA JSON file (default: DATA_DIR/stageN.json)")
    d.add_argument("--data-dir", default=str(layout.OPENAQA), help="stage1.json ... stage4.json (default: %(default)s)")
    d.add_argument("--audio-root", help="folder of the audio files (default and fallback: the JSON's folder)")
    d.add_argument("--audio-prefix", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite audio_id paths starting with OLD (repeatable)")
    d.add_argument("--skip-bad", action="store_true", help="skip (and report) entries whose audio is missing/bad")
    d.add_argument("--num-workers", type=at_least(0), default=4, help="data loader processes")
    t = p.add_argument_group("recipe (defaults: the --stage's, paper §III-E)")
    t.add_argument("--stage", type=int, choices=sorted(STAGES), help="train this stage only (default: 1 with --data, "
                   "--init-from or --resume; else the four stages in turn, skipping finished ones)")
    t.add_argument("--trainable", type=lambda s: tuple(s.split(",")), help="the parts, e.g. dass,projector,lora")
    t.add_argument("--lr", type=at_least(0, float, strict=True))
    t.add_argument("--epochs", type=at_least(1))
    t.add_argument("--max-steps", type=at_least(1), help="train exactly this many steps, overriding --epochs")
    t.add_argument("--batch-size", type=at_least(1), help="global batch (default 256)")
    t.add_argument("--micro-batch", type=at_least(1), help="entries per forward pass per process (default 4)")
    t.add_argument("--warmup-steps", type=at_least(0))
    t.add_argument("--grad-clip", type=at_least(0, float, strict=True))
    t.add_argument("--weight-decay", type=at_least(0, float))
    t.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save-every", type=at_least(0), help="steps between checkpoints (default 1000; 0: at the end)")
    c.add_argument("--keep", type=at_least(1), help="checkpoints kept (default 2)")
    again = c.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const="latest", help="continue from the newest readable checkpoint "
                       "in --output-dir (or the one given)")
    again.add_argument("--overwrite", action="store_true", help="start one stage afresh in an --output-dir that "
                       "holds another run (deletes its checkpoints, log and model)")
    c.add_argument("--log-every", type=at_least(1), default=10, help="steps between progress lines")
    args = p.parse_args(argv)
    if args.stage is None and (args.data or args.init_from or args.resume):
        args.stage = 1  # one stage's flags: stage 1 unless --stage says otherwise
    if args.overwrite and args.stage is None and not args.demo:
        p.error("--overwrite starts one stage afresh (with --stage N); the four stages resume on their own: to start "
                "the whole run afresh, delete its folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.demo:
            demo.run_demo(args.output_dir or "demo", seed=args.seed)  # its sizes: demo.DemoConfig
        else:
            layout.training_defaults(args)
            if args.stage is not None:
                run_stage(args)
            else:
                layout.run_curriculum(partial(curriculum_stage, args), args.output_dir)
    except (DataError, NonFiniteLoss, FileNotFoundError, KeyError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
