"""A converted HF model keeps its identity through the user's path: GRPO from the converted checkpoint with the
documented defaults (fresh optimizer, its own tokenizer), checkpoints that carry tokenizer + chat template +
config.json forward, an export transformers loads with the source's exact config, and clear vocabulary errors."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from megatron_r1.checkpoint.convert import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_r1.errors import ConfigError
from tests.checkpoint.hf_assets import write_tiny_tokenizer
from tests.rl.common import grpo_config

VOCAB = 300


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF dir with tokenizer + chat template, its Megatron conversion)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("identity")
    hf = root / "hf"
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         rms_norm_eps=9.999999747378752e-06, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(hf)
    write_tiny_tokenizer(hf, VOCAB)
    convert_hf_to_mcore(hf, root / "mcore", model="llama", progress=False)
    return hf, root / "mcore"


def _grpo(tmp, load, model: dict, **extra):
    """The RL tests' tiny GRPO run (tests/rl/common.py) on the converted model, with the tokenizer left unset."""
    sections = {
        "model": model, "tokenizer": None,  # `model` has every field: nothing of the tiny default remains
        "data": {"template": "Q: {prompt}\nA:", "options": {"num_samples": 32, "seed": 1}},
        "training": {"train_steps": 2, "micro_batch_size": 8, "global_batch_size": 8},
        "rl": {"prompts_per_step": 2, "max_prompt_length": 96, "max_response_length": 6, "mini_batch_size": 8},
        "generation": {"max_batch_size": 8},
        "rewards": [{"name": "tests.rl.plugin_rewards:digit_share"}],
        "logging": {"tensorboard": False},
        "checkpoint": {"load": str(load), "save_interval": 1},
    }
    for k, v in extra.items():
        sections[k] = {**(sections.get(k) or {}), **v}
    return grpo_config(tmp, **sections)


def _model_section(mcore: Path) -> dict:
    from megatron_r1.checkpoint.convert.convert import read_model_config, resolve_mcore_dir

    m, _ = read_model_config(resolve_mcore_dir(mcore))
    return asdict(m)


def test_tokenizer_unset_means_the_checkpoints_own(converted, tmp_path):
    hf, mcore = converted
    cfg = _grpo(tmp_path, mcore, _model_section(mcore))
    assert Path(cfg.tokenizer.path) == mcore / "hf"
    with pytest.raises(ConfigError, match=r"builtin:demo has 384 tokens.*300-token tokenizer"):
        _grpo(tmp_path, mcore, _model_section(mcore), tokenizer={"path": "builtin:demo"})


def test_demo_tokenizer_is_refused_for_a_larger_model_without_one(converted, tmp_path):
    import shutil

    _, mcore = converted
    bare = tmp_path / "bare"
    shutil.copytree(mcore, bare)
    shutil.rmtree(bare / "hf")
    with pytest.raises(ConfigError, match=r"carries no tokenizer.*demo tokenizer \(384 ids\).*1000-id model"):
        _grpo(tmp_path, bare, dict(_model_section(mcore), vocab_size=1000))


@pytest.mark.slow
def test_grpo_from_converted_checkpoint_then_export(converted, tmp_path, caplog):
    import transformers as tf

    from megatron_r1.rl.trainer import run_grpo

    hf, mcore = converted
    cfg = _grpo(tmp_path, mcore, _model_section(mcore))
    assert cfg.checkpoint.load_optimizer and not cfg.checkpoint.finetune  # the documented defaults
    ck_log = logging.getLogger("megatron_r1.checkpoint.checkpointing")
    ck_log.addHandler(caplog.handler)  # the megatron_r1 logger does not propagate to the root
    try:
        run_grpo(cfg)
        # Distinct messages: whether the megatron_r1 logger propagates to the root (where caplog listens too)
        # depends on what earlier tests configured, so one record can reach caplog's handler twice.
        fresh = {r.getMessage() for r in caplog.records if "model weights only" in r.getMessage()}
        assert len(fresh) == 1 and "fresh optimizer" in fresh.pop()

        ckpt = tmp_path / "ckpt"
        carried = ckpt / "iter_0000002" / "hf"
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
            assert (carried / name).read_bytes() == (hf / name).read_bytes(), name
        recorded = (ckpt / "iter_0000002" / "config.yaml").read_text()
        assert "path: null" in recorded  # the checkpoint's own tokenizer, not a path into a pruned iteration

        # Resuming the run's own checkpoint restores everything (step, optimizer): no fresh-optimizer line.
        caplog.clear()
        cfg2 = _grpo(tmp_path, mcore, _model_section(mcore), training={"train_steps": 3})
        assert Path(cfg2.tokenizer.path) == carried
        run_grpo(cfg2)
        assert not [r for r in caplog.records if "model weights only" in r.getMessage()]
        assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    finally:
        ck_log.removeHandler(caplog.handler)

    # eval on a dataset file: --num-problems cuts the file (it was refused), the tokenizer is the checkpoint's.
    from megatron_r1.rl.evaluate import main as eval_main

    rows = tmp_path / "held_out.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ?", "answer": str(i + 1)}) + "\n" for i in range(5)))
    assert eval_main(["--load", str(ckpt), "--dataset", str(rows), "--num-problems", "3", "--k", "2",
                      "--max-new-tokens", "4", "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_problems"] == 3 and result["k"] == 2

    back = convert_mcore_to_hf(ckpt, tmp_path / "export", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    src, new = json.loads((hf / "config.json").read_text()), json.loads((back / "config.json").read_text())
    assert new == src  # exact: bos/eos/pad ids, the float32 rms_norm_eps, everything
    model = tf.AutoModelForCausalLM.from_pretrained(back)
    tok = tf.AutoTokenizer.from_pretrained(back)
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")
