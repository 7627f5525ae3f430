"""Choosing the next token, and the generation loop shared by the Mamba and LLaMA language models.

The paper (§III-D) samples with `PAPER_SAMPLING`. The logits are processed as transformers' `generate` does, in its
order (repetition penalty, temperature, top-k, top-p), so greedy decoding gives the same tokens. A model takes part
by providing embed(input_ids (B, L)) -> (B, L, d); prefill(inputs_embeds (B, L, d), attention_mask (B, L) or None,
max_length) -> (last logits (B, V), a cache with room for max_length positions); decode_step(token (B,), cache)
-> logits (B, V), advancing the cache in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

PAPER_SAMPLING = dict(do_sample=True, temperature=0.1, top_k=500, top_p=0.95, repetition_penalty=1.1)
MAX_NEW_TOKENS = 400  # LTU's answer length, which the paper's evaluation follows


def join(model, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
    """The sequence a language model reads: inputs_embeds (B, P, d) (the audio tokens), then the embeddings of
    input_ids (B, L) -> (B, P + L, d) in the embeddings' dtype. Either may be absent, not both."""
    if input_ids is None:
        if inputs_embeds is None:
            raise ValueError("pass input_ids, inputs_embeds or both")
        return inputs_embeds
    text = model.embed(input_ids)
    return text if inputs_embeds is None else torch.cat([inputs_embeds.to(text.dtype), text], dim=1)


def left_pad(rows: list[Tensor], seen: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts rows[i] (L_i, d) with token ids seen[i] as one batch, aligned on the right -> embeds (B, max L_i, d)
    with zeros before each row, attention_mask (B, max L_i) with 0 there, seen (B, max len) with -1 (no token)."""
    width, device = max(r.shape[0] for r in rows), rows[0].device
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    ids = torch.full((len(rows), max(map(len, seen))), -1, dtype=torch.long, device=device)
    for i, (row, s) in enumerate(zip(rows, seen)):
        embeds[i, width - row.shape[0]:], mask[i, width - row.shape[0]:] = row, 1
        ids[i, ids.shape[1] - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
    return embeds, mask, ids


def check_attention_mask(attention_mask: Tensor | None, batch: int, length: int, prompt: bool = False) -> None:
    """attention_mask (batch, length): 1 at real positions; a prompt to generate after must be left-padded."""
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be (batch, length) {(batch, length)}, not {tuple(attention_mask.shape)}")
    if attention_mask is not None and prompt and length and not attention_mask[:, -1].bool().all():
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 in every row")


def process_logits(logits: Tensor, seen: Tensor | None, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, repetition_penalty: float = 1.0) -> Tensor:
    """Next-token logits (B, V) -> the scores sampled from (filtered entries -inf). seen (B, T): the token ids
    already in the sequence, for the repetition penalty (entries < 0 are padding), or None."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        hits = torch.zeros_like(logits).scatter_add_(1, seen.clamp(min=0), (seen >= 0).to(logits.dtype))
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(hits > 0, penalized, logits)
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # drop the least likely tokens whose probabilities add up to at most 1 - top_p; always keep the best one
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_token(logits: Tensor, seen: Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,): the argmax (greedy) or a draw from the processed distribution."""
    if not do_sample:
        return process_logits(logits, seen, repetition_penalty=repetition_penalty).argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature} (do_sample=False is greedy)")
    scores = process_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
             attention_mask: Tensor | None = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, seen_ids: Tensor | None = None) -> Tensor:
    """The prompt inputs_embeds (B, P, d) then input_ids (B, L) (either may be absent), left-padded as attention_mask
    (B, P + L) marks -> up to max_new_tokens new tokens (B, T). seen_ids (B, S): the ids the repetition penalty counts
    (< 0: none; default input_ids). After eos_token_id a row gets pad_token_id (default: EOS); all rows done: stop."""
    embeds = join(model, input_ids, inputs_embeds)
    batch, length = embeds.shape[:2]
    logits, cache = model.prefill(embeds, attention_mask, length + max_new_tokens)
    seen = seen_ids if seen_ids is not None else input_ids
    seen = seen if seen is not None else embeds.new_zeros(batch, 0, dtype=torch.long)
    start = seen.shape[1]  # the new tokens are appended to seen
    finished = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
    for step in range(max_new_tokens):
        token = next_token(logits, seen, do_sample, temperature, top_k, top_p, repetition_penalty, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id if pad_token_id is None else pad_token_id)
            finished |= token == eos_token_id
        seen = torch.cat([seen, token[:, None]], dim=1)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = model.decode_step(token, cache)
    return seen[:, start:]  # (B, T)
