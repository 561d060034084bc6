"""The stage prologue every trainer starts with (training/prologue.py): vocabulary check, micro-batch count, and the
stage's samples (train / held-out, the data options, bad rows) for plain samples and for preference pairs."""
import json

import pytest

from megatron_r1.config import load_config
from megatron_r1.errors import ConfigError, DataError
from megatron_r1.reward_model.preferences import load_preferences
from megatron_r1.training.prologue import StageStart, check_vocab, num_microbatches


class _Tok:
    vocab_size = 300


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _stage(*overrides):
    cfg = load_config(None, list(overrides))
    return StageStart(cfg, ctx=None, tokenizer=_Tok())


def test_vocab_smaller_than_tokenizer_is_refused_naming_field():
    cfg = load_config(None, ["model.vocab_size=256", "tokenizer.path=tok-dir"])
    with pytest.raises(ConfigError, match=r"model.vocab_size: 256 .*\(300, tok-dir\)"):
        check_vocab(cfg, _Tok())
    check_vocab(load_config(None, ["model.vocab_size=300"]), _Tok())


def test_num_microbatches_divides_the_global_batch():
    cfg = load_config(None, ["training.global_batch_size=16", "training.micro_batch_size=2"])
    assert num_microbatches(cfg, 1) == 8 and num_microbatches(cfg, 4) == 2
    with pytest.raises(ConfigError, match="training.global_batch_size: 16 .*2×3"):
        num_microbatches(cfg, 3)


def test_train_and_heldout_samples_come_from_source_and_eval_source(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": "c", "answer": "3"}])
    stage = _stage(f"data.source={train}", f"data.eval_source={held}")
    assert [r["prompt"] for r in stage.samples("train")] == ["a", "b"]
    assert [r["prompt"] for r in stage.samples("test")] == ["c"]
    builtin = _stage("data.source=builtin:countdown", "data.options.num_samples=12")
    assert len(builtin.samples("train")) > 0 and builtin.samples("train") == builtin.samples("train")


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a"}, "{not json", {"prompt": "b"}])
    with pytest.raises(DataError, match=r"t.jsonl:2"):
        _stage(f"data.source={path}").samples("train")
    skipped = _stage(f"data.source={path}", "data.skip_bad_rows=true").samples("train")
    assert [r["prompt"] for r in skipped] == ["a", "b"]
    # the held-out split obeys the same option
    kept = _stage(f"data.source={path}", f"data.eval_source={path}", "data.skip_bad_rows=true").samples("test")
    assert len(kept) == 2


def test_empty_training_set_is_an_error_naming_the_source(tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty.jsonl: no usable rows"):
        _stage(f"data.source={empty}").samples("train")
    # a loader that returns nothing (every row skipped) is refused by the prologue itself
    with pytest.raises(DataError, match=r"prefs.jsonl: no training samples \(data.source\)"):
        path = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "", "rejected": "r"}])
        _stage(f"data.source={path}", "data.skip_bad_rows=true").samples("train", loader=load_preferences)


def test_preference_pairs_through_the_same_prologue(tmp_path):
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad"}, {"prompt": "p2", "chosen": "good", "rejected": ""}]
    path = _jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError, match=r"prefs.jsonl: row 1: preference field 'rejected'"):
        _stage(f"data.source={path}").samples("train", loader=load_preferences)
    kept = _stage(f"data.source={path}", "data.skip_bad_rows=true").samples("train", loader=load_preferences)
    assert [r["prompt"] for r in kept] == ["p1"]
    generated = _stage("data.source=builtin:preferences", "data.options.num_samples=40")
    train = generated.samples("train", loader=load_preferences)
    held = generated.samples("test", loader=load_preferences)
    assert train and held and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
