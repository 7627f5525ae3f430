"""The README's reading guide: from the paper to the code, each row pointing at the line that implements it.

`python tools/reading_guide.py` rewrites the table in README.md from the anchors below; `--check` only says whether
the README is up to date (tests/test_docs.py runs it).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| paper | code | what to read |\n|---|---|---|\n"

# the paper's part -> (file, a text on exactly one line of it: the line to point at, what to read there)
GUIDE = {
    "Eqs. (1)–(2): continuous SSM h'(t) = A h + B x, y = C h": ("scan.py", "Glossary (code name -> paper symbol",
        "the glossary: which tensor is A, B, C, Δ, h (the code works with the discretised form)"),
    "Eq. (3): Ā = exp(ΔA)": ("scan.py", "# eq. (3)  Ā = exp(ΔA)", "`selective_scan_ref`, one step of the loop"),
    "Eq. (4): B̄ (Euler form ΔB, as Mamba's code)": ("scan.py", "# eq. (4)  B̄x = ΔB x (Euler)",
        "same loop; why Euler: the module docstring"),
    "Eq. (5): h_t = Ā h_{t−1} + B̄ x_t": ("scan.py", "# eq. (5)  h_t = Ā h_{t-1} + B̄ x_t",
        "same loop; the fast versions: `_scan_chunked`, `triton_scan.py`"),
    "Eq. (6): y_t = C h_t": ("scan.py", "# eq. (6)  y_t = C h_t  ", "same loop (+ D·x and the gate silu(z))"),
    "Eq. (5) for all t at once (CPU)": ("scan.py", "def _scan_recurrence_(",
        "`_scan_recurrence_` (chunks, three passes), `_Recurrence` (its backward)"),
    "Selective Δ, B, C from the input (§III-A)": ("mamba.py", "def _ssm_inputs(",
        "`MambaMixer._ssm_inputs`; DASS: `SS2D.forward`"),
    "Eqs. (3)–(6) one token at a time (decoding)": ("scan.py", "def selective_state_update(",
        "`selective_state_update`"),
    "Fig. 1: audio → fbank (1024 × 128)": ("audio.py", "def dass_input(",
        "`audio.dass_input` (Kaldi fbank: `audio.fbank`)"),
    "Fig. 1: DASS (§III-B)": ("dass.py", "class DASS(nn.Module)",
        "`DASS.features` → (B, 768, 4, T/32); SS2D's four scans: `SS2D.forward`"),
    "Fig. 1: down-sampling conv (k 3, s 2)": ("sslalm.py", "self.audio_conv = nn.Conv2d(", "`SSLALM.audio_tokens`"),
    "Fig. 1: 32 audio tokens → Linear(768 → d)": ("sslalm.py", "self.audio_proj = nn.Linear(",
        "`SSLALM.audio_tokens`"),
    "Fig. 1: audio tokens prefixed to the prompt": ("sslalm.py", "# audio prefix, then the prompt",
        "`SSLALM.forward` (`sampling.join`); for answers `SSLALM.generate` (`sampling.left_pad`)"),
    "Fig. 1: frozen LLM — Mamba-2.8B (§III-C)": ("mamba.py", "class MambaLM(", "`MambaLM`"),
    "Fig. 1: frozen LLM — Vicuna-7B (§III-C)": ("llama.py", "class LlamaLM(", "`LlamaLM`"),
    "Fig. 1: LoRA adapters (r 8, α 16)": ("lora.py", "class LoRALinear(",
        "`LoRALinear`, `add_lora`; targets: `PAPER_TARGETS`"),
    "Trainable vs frozen (green boxes)": ("sslalm.py", "def set_trainable(", "`SSLALM.set_trainable`"),
    "§III-D: the prompt (LTU's template)": ("sslalm.py", "PROMPT_TEMPLATE = ",
        "`PROMPT_TEMPLATE`, `SSLALM.encode_example`"),
    "§III-D: the training objective": ("sslalm.py", "return F.cross_entropy(",
        "`SSLALM.forward`: next-token cross-entropy on the text tokens"),
    "§III-D: generation settings": ("sampling.py", "PAPER_SAMPLING = ",
        "`PAPER_SAMPLING`, `process_logits`, `generate`"),
    "§III-E: LTU's four-stage recipe": ("trainer.py", "STAGES = {", "`STAGES`, `TrainConfig.for_stage`, `train`"),
    "§III-E: parameter counts": ("sslalm.py", "def parameter_table(", "`python cli.py params`"),
    "Table I: evaluation protocol": ("evaluate.py", "TASKS = {", "`evaluate.py` (module docstring: the protocol)"),
}


def line_of(file: str, anchor: str) -> int:
    lines = (ROOT / file).read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if anchor in line]
    if len(hits) != 1:
        raise SystemExit(f"reading guide: {anchor!r} is on {len(hits)} lines of {file}; it must be on exactly one")
    return hits[0]


def table() -> str:
    rows = []
    for paper, (file, anchor, what) in GUIDE.items():
        n = line_of(file, anchor)
        rows.append(f"| {paper} | [`{file}:{n}`]({file}#L{n}) | {what} |\n")
    return HEADER + "".join(rows)


def main(argv: list[str]) -> int:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(HEADER)
    end = readme.index("\n\n", start)
    new = readme[:start] + table().rstrip("\n") + readme[end:]
    if "--check" in argv:
        if new != readme:
            print("README.md's reading guide is out of date: run python tools/reading_guide.py", file=sys.stderr)
            return 1
        return 0
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
