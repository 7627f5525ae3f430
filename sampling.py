"""Choosing the next token, and the generation loop shared by the Mamba and LLaMA language models.

The paper (§III-D) generates with temperature 0.1, top-k 500, top-p 0.95 and a repetition penalty of 1.1
(`PAPER_SAMPLING`). The logit processing follows the order and the definitions of Hugging Face transformers'
`generate`, so that greedy decoding gives the same tokens: repetition penalty, then temperature, top-k, top-p.
Written here because transformers' `generate` drives its own model classes and caches, not ours.

A model takes part by providing three methods:
    embed(input_ids (B, L)) -> (B, L, d)
    prefill(inputs_embeds (B, L, d), attention_mask (B, L) or None, max_length) -> (logits of the last position
        (B, V), cache); the cache has room for max_length positions in all; the mask is checked with
        `check_attention_mask(..., prompt=True)`
    decode_step(token (B,), cache) -> logits (B, V), advancing the cache by one position in place
A prompt may start with embeddings that are not tokens (the audio tokens of Fig. 1): `join` puts them before the
text's embeddings, and `left_pad` batches prompts of different lengths.
"""
from __future__ import annotations

import torch
from torch import Tensor

PAPER_SAMPLING = dict(do_sample=True, temperature=0.1, top_k=500, top_p=0.95, repetition_penalty=1.1)
MAX_NEW_TOKENS = 400  # LTU's answer length, which the paper's evaluation follows


def join(model, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
    """The sequence a language model reads: inputs_embeds (B, P, d) (the audio tokens), then the embeddings of
    input_ids (B, L) -> (B, P + L, d) in the embeddings' dtype. Either may be absent, not both."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids, inputs_embeds or both")
    if input_ids is None:
        return inputs_embeds
    text = model.embed(input_ids)
    return text if inputs_embeds is None else torch.cat([inputs_embeds.to(text.dtype), text], dim=1)


def left_pad(rows: list[Tensor], seen: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts of different lengths as one batch, aligned on the right so that every row's last position is real.

    rows[i]: (L_i, d) embeddings; seen[i]: the row's token ids (for the repetition penalty). Returns embeds
    (B, max L_i, d) with zeros before each row, attention_mask (B, max L_i) with 0 there, and seen (B, max len)
    with -1 (no token) before each row's ids.
    """
    width, device = max(r.shape[0] for r in rows), rows[0].device
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    ids = torch.full((len(rows), max(map(len, seen))), -1, dtype=torch.long, device=device)
    for i, (row, s) in enumerate(zip(rows, seen)):
        embeds[i, width - row.shape[0]:], mask[i, width - row.shape[0]:] = row, 1
        ids[i, ids.shape[1] - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
    return embeds, mask, ids


def check_attention_mask(attention_mask: Tensor | None, batch: int, length: int, prompt: bool = False) -> None:
    """attention_mask, 1 at real positions and 0 at padding, must be (batch, length); a prompt to generate after
    must be left-padded (its last position real in every row), or its last logits would come from padding."""
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be (batch, length) = {(batch, length)}; "
                         f"got {tuple(attention_mask.shape)}")
    if prompt and length and not attention_mask[:, -1].bool().all():
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 in every row")


def process_logits(logits: Tensor, seen: Tensor | None, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, repetition_penalty: float = 1.0) -> Tensor:
    """Turn next-token logits (B, V) into the scores that are sampled from (filtered entries are -inf).

    seen: (B, T) token ids already in the sequence (prompt and generated), for the repetition penalty, or None;
    entries < 0 are padding and count for nothing.
    """
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
    """Generate up to max_new_tokens tokens after a prompt; returns the new tokens (B, T).

    The prompt is inputs_embeds (B, P, d) followed by the embeddings of input_ids (B, L); either may be absent.
    inputs_embeds is how the audio tokens arrive. Rows of different lengths are left-padded and marked with
    attention_mask (B, P + L), 1 for real positions. The tokens that count as seen for the repetition penalty are
    seen_ids (B, S) if given (entries < 0 are padding), else input_ids, plus every generated token. A row that has
    produced eos_token_id is finished: it gets pad_token_id (default: the EOS) from then on, and generation stops
    when every row has finished.
    """
    embeds = join(model, input_ids, inputs_embeds)
    batch, length = embeds.shape[:2]
    logits, cache = model.prefill(embeds, attention_mask, length + max_new_tokens)
    seen = seen_ids if seen_ids is not None else input_ids
    seen = seen if seen is not None else embeds.new_zeros(batch, 0, dtype=torch.long)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
    tokens = []
    for step in range(max_new_tokens):
        token = next_token(logits, seen, do_sample, temperature, top_k, top_p, repetition_penalty, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, pad)
            finished |= token == eos_token_id
        tokens.append(token)
        seen = torch.cat([seen, token[:, None]], dim=1)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = model.decode_step(token, cache)
    return torch.stack(tokens, dim=1) if tokens else embeds.new_zeros(batch, 0, dtype=torch.long)
