"""Tokenizers the server accepts: the built-in demo one, an HF directory, and DeepSeek-V3's (inside litellm)."""
import importlib.util

import pytest

from megatron_r1.errors import UserError
from megatron_r1.inference.tokenizer import deepseek_v3_tokenizer_path, load_tokenizer


def test_builtin_demo_roundtrip():
    tok = load_tokenizer("builtin:demo")
    text = "What is 2 plus 3? <think> 5 </think>"
    assert tok.decode(tok.encode(text)) == text


def test_hf_directory(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello world") == [2, 3]


@pytest.mark.skipif(importlib.util.find_spec("litellm") is None,
                    reason="optional extra: the DeepSeek-V3 tokenizer ships inside `litellm` (pip install litellm)")
def test_deepseek_v3_tokenizer_from_litellm():
    tok = load_tokenizer("deepseek_v3")
    assert tok.vocab_size >= 128_000  # 129,280 incl. added tokens
    ids = tok.encode("<think>\n2 + 3 = 5\n</think>")
    assert tok.decode(ids) == "<think>\n2 + 3 = 5\n</think>"
    assert len(tok.encode("<think>")) == 1  # a single special token, as in DeepSeek-R1


def test_deepseek_v3_missing_litellm_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install litellm"):
        deepseek_v3_tokenizer_path()
