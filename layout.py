"""The default layout of weights, data and runs, relative to the current directory (drawn in the README): the paths
train.py and evaluate.py take when their flags do not name others.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch.distributed as dist

import weights

WEIGHTS, DATA, RUNS = Path("weights"), Path("data"), Path("runs")
OPENAQA = DATA / "openaqa"
ESC50 = DATA / "ESC-50-master"
STAGE_NUMBERS = (1, 2, 3, 4)
FINAL_FILES = ("model.safetensors", "config.json")  # a finished model; train.py writes config.json last
LTU_DATA = "github.com/YuanGongND/ltu"

# stage -> LTU's published OpenAQA file it reads (LTU's train_script/stage*.sh)
STAGE_SOURCES = {
    1: "closed_ended/combine_cla.json",    # classification ('Breakdown Subsets' download)
    2: "closed_ended/combine_cla.json",    # the same file as stage 1
    3: "closed_ended/all_closed_qa.json",  # all closed-ended questions ('Breakdown Subsets')
    4: "openaqa_5.6M.json",                # all of OpenAQA, open and closed ('Full Dataset')
}

# Table I task -> (folder under data/, LTU's eval JSON, LTU's label CSV or None for captioning); ESC-50 is ESC50
EVAL_SETS = {
    "dcase": ("dcase17", "dcase17.json", "class_labels_indices_dcase.csv"),
    "vs": ("vocalsound", "vocalsound_test.json", "class_labels_indices_vs.csv"),
    "tut": ("tut17", "tut_17.json", "class_labels_indices_tut.csv"),
    "bjo": ("beijing_opera", "beijing_opera.json", "class_labels_indices_bj.csv"),
    "vgg": ("vggsound", "vggsound_eval.json", "class_labels_indices_vgg.csv"),
    "fsd": ("fsd50k", "fsd50k_eval.json", "class_labels_indices_fsd50k.csv"),
    "audioset": ("audioset", "audioset_eval.json", "class_labels_indices_as.csv"),
    "audiocaps": ("audiocaps", "audiocaps_test.json", None),
    "clotho": ("clotho", "clotho_caption_evaluation.json", None),
}


def stage_dir(run: str | Path, stage: int) -> Path:
    return Path(run) / f"stage{stage}"


def stage_file(data_dir: str | Path, stage: int) -> Path:
    return Path(data_dir) / f"stage{stage}.json"


def finished(folder: str | Path) -> bool:
    """Whether `folder` holds a finished model (not only checkpoints of an interrupted run)."""
    return all((Path(folder) / name).is_file() for name in FINAL_FILES)


def newest_model(root: str | Path = RUNS) -> Path | None:
    """The most recently finished model in root/<run>/ or root/<run>/<stage>/, or None."""
    found = [d for d in (*Path(root).glob("*"), *Path(root).glob("*/*")) if d.is_dir() and finished(d)]
    return max(found, key=lambda d: (d / "config.json").stat().st_mtime_ns, default=None)


class MissingFiles(FileNotFoundError):
    """Default paths that were looked for and not found; the message says what to download and where it goes."""

    def __init__(self, missing: list[tuple[str, str]], flags: str):
        self.missing = missing
        width = max(len(path) for path, _ in missing)
        lines = [f"not found in the default layout (relative to {Path.cwd()}):"]
        lines += [f"  {path:<{width}}  {what}" for path, what in missing]
        lines.append(f"Put them there (README: the paper's models), or pass other paths: {flags}.")
        super().__init__("\n".join(lines))


def say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def training_defaults(args: argparse.Namespace) -> None:
    """Fill train.py's unset paths from the layout; raise MissingFiles naming every default path not found. Without
    --stage, only unfinished stages need their data, only stage 1 DASS and the LLM; with --stage N, --init-from is
    stage N-1's folder if finished; with --data given, missing weights are left to the loader."""
    from_layout = args.stage is None or args.data is None  # the data too comes from the layout
    run = Path(args.output_dir) if args.stage is None and args.output_dir else RUNS / f"{args.size}-{args.llm}"
    if args.stage is None:
        args.output_dir = str(run)
        stages = [s for s in STAGE_NUMBERS if not finished(stage_dir(run, s))]
        builds = 1 in stages
    else:
        stages = [args.stage] if from_layout else []
        args.output_dir = args.output_dir or str(stage_dir(run, args.stage))
        if args.init_from is None and args.stage > 1 and finished(stage_dir(run, args.stage - 1)):
            args.init_from = str(stage_dir(run, args.stage - 1))
        builds = args.init_from is None
        args.data = args.data or str(stage_file(args.data_dir, args.stage))
    missing, dass = [], WEIGHTS / f"DASS_{args.size}.pth"
    if builds and args.dass_weights is None:
        if dass.is_file():
            args.dass_weights = str(dass)
        elif from_layout:
            missing.append((str(dass), weights.WHERE_TO_GET["dass"]))
    llms = [WEIGHTS / "mamba-2.8b-hf", WEIGHTS / "mamba-2.8b"] if args.llm == "mamba" else [WEIGHTS / "vicuna-7b-v1.5"]
    found = [p for p in llms if p.is_dir()]  # Mamba in the Hugging Face format first, then in the original one
    if args.llm_weights is None and found:
        args.llm_weights = str(found[0])
    elif args.llm_weights is None and builds and from_layout:
        missing.append((" or ".join(f"{p}/" for p in llms), weights.WHERE_TO_GET[args.llm]))
    missing += [(str(stage_file(args.data_dir, s)), f"LTU's OpenAQA {STAGE_SOURCES[s]} ({LTU_DATA}), with its "
                 "audio (16 kHz)") for s in stages if not stage_file(args.data_dir, s).is_file()]
    if missing:
        raise MissingFiles(missing, "--dass-weights, --llm-weights, --data-dir (or --stage N --data FILE)")


def run_curriculum(run_stage: Callable[[int, Path, Path | None], object], run: str | Path,
                   say: Callable[[str], None] = say) -> Path:
    """LTU's four stages (paper §III-E) in order: run_stage(stage, output_dir, init_from) trains stage N into
    run/stageN from stage N-1's model; a finished stage is skipped. Returns the last stage's folder."""
    previous = None
    for stage in STAGE_NUMBERS:
        out = stage_dir(run, stage)
        if finished(out):
            say(f"stage {stage} of {len(STAGE_NUMBERS)}: finished in {out}, skipped")
        else:
            start = f"from {previous}" if previous else "from the pretrained DASS and LLM"
            say(f"stage {stage} of {len(STAGE_NUMBERS)}: -> {out}, {start}")
            run_stage(stage, out, previous)
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # rank 0 writes the final model after the other ranks return
            if not finished(out):
                raise RuntimeError(f"stage {stage} returned without a finished model in {out}")
        previous = out
    return previous


def evaluation_defaults(args: argparse.Namespace, say: Callable[[str], None] = say) -> None:
    """Fill evaluate.py's unset paths from the layout (the newest finished model under runs/ unless --checkpoint or
    --output; ESC50 or EVAL_SETS' folder); raise MissingFiles naming every default path not found."""
    wanted = []  # (path, a folder's with a final slash; what it is)
    if args.checkpoint is None and args.output is None:
        newest = newest_model()
        if newest is None:
            wanted.append((f"{RUNS}/<run>/stageN", "no finished model: train one with `python train.py --size small "
                           "--llm mamba`"))
        else:
            args.checkpoint = str(newest)
            say(f"model: {newest} (the newest finished model under {RUNS}/; --checkpoint picks another)")
    if args.task == "esc50" and not (args.esc50_root or args.data):
        args.esc50_root = str(ESC50)
        what = "ESC-50 (github.com/karolpiczak/ESC-50) unpacked as data/ESC-50-master"
        wanted += [(f"{ESC50}/meta/esc50.csv", what), (f"{ESC50}/audio/", what)]
    elif args.task in EVAL_SETS and not args.data:
        name, data_json, labels = EVAL_SETS[args.task]
        folder = DATA / name
        args.data = str(folder / data_json)
        wanted.append((args.data, f"LTU's eval data {data_json} ({LTU_DATA}, 'LTU Evaluation Data')"))
        if labels and not args.labels:
            args.labels = str(folder / labels)
            wanted.append((args.labels, f"LTU's src/ltu/eval/labels/{labels} ({LTU_DATA})"))
        if not args.audio_root:
            args.audio_root = str(folder / "audio")
            wanted.append((f"{folder}/audio/", "the clips at 16 kHz, named as the JSON's audio_id"))
    missing = [(path, what) for path, what in wanted if not Path(path).exists()]
    if missing:
        raise MissingFiles(missing, "--checkpoint, --esc50-root, --data, --labels, --audio-root")
