"""Tokenizers: the demo tokenizer's exact roundtrip and compactness; HF tokenizer.json loading; save/load."""
import json
import random

import pytest

from megatron_r1.data import DemoTokenizer, HFTokenizer, Tokenizer, get_template, load_tokenizer
from megatron_r1.errors import ConfigError


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer("builtin:demo")


def test_interface_and_vocab_padding(demo):
    assert isinstance(demo, Tokenizer)
    assert demo.vocab_size % 128 == 0 and demo.vocab_size == len(demo.vocab)
    assert len({demo.pad_id, demo.eos_id, demo.bos_id}) == 3
    assert [demo.vocab[i] for i in (demo.pad_id, demo.eos_id, demo.bos_id)] == ["<pad>", "<eos>", "<bos>"]


def test_exact_roundtrip_for_any_ascii_and_unicode(demo):
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(chr(rng.randrange(128)) for _ in range(rng.randrange(200)))
        assert demo.decode(demo.encode(text)) == text
    for text in ["  double  spaces\n\n\ttabs ", "<think></think><answer>", "Assistant:Assistant",
                 "数学 é \u2212 \U0001F600",
                 "<eos><pad><bos><unused400><0x80>", ""]:
        assert demo.decode(demo.encode(text)) == text


def test_specials_are_never_produced_from_text(demo):
    ids = demo.encode("<eos> <pad><bos>")
    assert not {demo.eos_id, demo.pad_id, demo.bos_id} & set(ids)
    assert demo.decode([demo.bos_id] + demo.encode("hi") + [demo.eos_id, demo.pad_id]) == "hi"


def test_tags_and_template_words_are_single_tokens(demo):
    for tag in ["<think>", "</think>", "<answer>", "</answer>"]:
        assert len(demo.encode(tag)) == 1 and len(demo.encode(" " + tag)) == 1
    for word in [" Assistant", " reasoning", " conversation", " plus", " answer"]:
        assert len(demo.encode(word)) == 1, word


def test_demo_prompt_and_document_lengths(demo):
    prompt = get_template("r1_zero").format("3*4+5")
    assert 70 <= len(demo.encode(prompt)) <= 90
    doc = prompt + " <think> 3 * 4 = 12 , 12 + 5 = 17 </think> <answer> 17 </answer>"
    assert len(demo.encode(doc)) < 160


def test_decode_rejects_out_of_range(demo):
    with pytest.raises(ValueError, match="out of range"):
        demo.decode([demo.vocab_size])


def test_demo_save_and_load(tmp_path, demo):
    demo.save(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, DemoTokenizer) and again.vocab == demo.vocab
    text = "User: 12+7. Assistant: <think> 12 + 7 = 19 </think>"
    assert again.encode(text) == demo.encode(text)


def _make_hf_tokenizer(directory):
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<think>": 5}
    tok = HFTok(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_hf_tokenizer_directory_file_and_save(tmp_path):
    d = _make_hf_tokenizer(tmp_path / "hf")
    tok = load_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (2, 1, 2, 6)
    assert tok.encode("hello world") == [3, 4] and tok.decode([1, 3, 4, 2]) == "hello world"
    assert load_tokenizer(str(d / "tokenizer.json")).encode("world hello") == [4, 3]
    tok.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert load_tokenizer(str(tmp_path / "saved")).eos_id == 2


def test_hf_tokenizer_config_overrides_specials(tmp_path):
    d = _make_hf_tokenizer(tmp_path / "hf")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<think>"}}))
    assert load_tokenizer(str(d)).eos_id == 5


def test_bad_specs(tmp_path):
    with pytest.raises(ConfigError, match="unknown built-in tokenizer"):
        load_tokenizer("builtin:gpt2")
    with pytest.raises(ConfigError, match="expected builtin:demo"):
        load_tokenizer(str(tmp_path))


CHATS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "12 plus 5?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think> hello </think>"},
     {"role": "user", "content": "again {braces} \\n and newlines\n"}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers_token_ids(tmp_path, generation_prompt):
    import transformers as tf

    from tests.checkpoint.hf_assets import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    ours, ref = load_tokenizer(str(tmp_path)), tf.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == ref.chat_template
    for messages in CHATS:
        want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == list(want)
    # data.template: chat is the prompt as one user message through the same template
    text = get_template("chat", ours).format("What is 3 + 4?")
    assert ours.encode(text) == ours.apply_chat_template(CHATS[0])


def test_chat_template_from_jinja_file_and_missing(tmp_path):
    from tests.checkpoint.hf_assets import CHATML, write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "a", chat_template=None)
    (tmp_path / "a" / "chat_template.jinja").write_text(CHATML)
    assert load_tokenizer(str(tmp_path / "a")).chat_template == CHATML
    write_tiny_tokenizer(tmp_path / "b", chat_template=None)
    with pytest.raises(ConfigError, match="chat needs a tokenizer with a chat template"):
        get_template("chat", load_tokenizer(str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="chat needs a tokenizer"):
        get_template("chat")


def test_copy_tokenizer_files_is_byte_identical(tmp_path):
    from megatron_r1.data.tokenizer import copy_tokenizer_files
    from tests.checkpoint.hf_assets import write_tiny_tokenizer

    src = write_tiny_tokenizer(tmp_path / "src")
    assert sorted(copy_tokenizer_files(str(src), tmp_path / "dst")) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert copy_tokenizer_files("builtin:demo", tmp_path / "demo") == ["demo_tokenizer.json"]
    assert load_tokenizer(str(tmp_path / "demo")).vocab == DemoTokenizer().vocab
