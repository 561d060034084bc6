"""Memory plan: each component against hand arithmetic, the 1F1B and recompute rules, the CLI's JSON."""
import json

import pytest

from megatron_r1.config import load_config
from megatron_r1.errors import ConfigError
from megatron_r1.planning import plan_memory
from megatron_r1.planning.cli import main as plan_main
from megatron_r1.planning.memory import GIB, layer_activation_elements, stage_activation_bytes, resolve_layout
from tests.planning.test_params import TINY_EXPERTS, TINY_MAIN, TINY_ROWS


def cfg(*overrides):
    return load_config(None, list(overrides))


def test_tiny_weights_grads_optimizer_by_hand():
    # 4 GPUs, TP 1, PP 1 -> DP 4; EP 2 -> expert DP 2; bf16 weights, fp32 grads, 12-byte optimizer states sharded.
    c = cfg("model.preset=deepseek_v3_tiny", "parallel.expert_model_parallel_size=2",
            "parallel.use_distributed_optimizer=true", "training.precision=bf16", "training.global_batch_size=16")
    plan = plan_memory(c, nodes=1, gpus_per_node=4, overhead_gb=0)
    experts_per_gpu = 3 * 2 * (3 * 256 * 384)  # 3 MoE layers × 2 of the 4 experts here × one SwiGLU expert
    dense = TINY_MAIN - 3 * TINY_EXPERTS + 2 * (TINY_ROWS - 512) * 256  # embedding and output as padded
    per_gpu = dense + experts_per_gpu
    g = plan.per_gpu_gb
    assert plan.params_per_gpu == per_gpu
    assert g["parameters"] == round(per_gpu * 2 / GIB, 3)
    assert g["gradients"] == round(per_gpu * 4 / GIB, 3)
    assert g["optimizer"] == round((dense * 12 / 4 + experts_per_gpu * 12 / 2) / GIB, 3)
    assert g["kv_cache"] == 0 and g["reference_model"] == 0  # pretrain: no engine, no reference
    assert plan.layout.dp == 4 and plan.layout.edp == 2


def test_optimizer_replicated_without_distributed_optimizer():
    c = cfg("model.preset=deepseek_v3_tiny", "training.precision=bf16")
    plan = plan_memory(c, nodes=1, gpus_per_node=4)
    assert plan.per_gpu_gb["optimizer"] == round((TINY_MAIN + 2 * (TINY_ROWS - 512) * 256) * 12 / GIB, 3)
    assert any("use_distributed_optimizer" in n for n in plan.notes)


def test_dense_layer_activation_elements_by_hand():
    # llama_tiny: h 128, 4 heads of 32, 2 query groups, FFN 384, TP 1
    c = cfg("model.preset=llama_tiny")
    h, n, g, d, f = 128, 4, 2, 32, 384
    expected = (2 * h  # attention norm input + qkv input
                + (n + 2 * g) * d + 2 * n * d + 2 * g * d  # qkv output; q, k, v, attention output
                + 2 * h + 3 * f)  # MLP norm input + fc1 input; fc1 output (gate, up) + activation
    assert layer_activation_elements(c, 0, tp=1) == expected
    # TP 2 with sequence parallelism halves every term (query groups split 1 per rank)
    assert layer_activation_elements(c, 0, tp=2) == expected / 2


def test_one_f_one_b_in_flight_and_recompute():
    c = cfg("model.preset=llama_tiny", "parallel.pipeline_model_parallel_size=2", "training.micro_batch_size=1",
            "training.global_batch_size=8")
    lay = resolve_layout(c, 2)
    assert lay.num_microbatches == 8
    per_layer = layer_activation_elements(c, 0, 1) * 256 * 2  # 256 tokens, bf16... precision auto plans bf16
    full0, rc0 = stage_activation_bytes(c, lay, 0, 1, 2)
    assert full0 == 2 * per_layer  # first stage: PP = 2 micro-batches in flight × its one layer
    assert rc0 == 2 * 1 * 128 * 256 * 2 + per_layer  # layer inputs of 2 micro-batches + one layer re-run
    full1, _ = stage_activation_bytes(c, lay, 1, 1, 2)
    rows = c.model.padded_vocab_size()
    assert full1 == per_layer + 256 * rows * 4  # last stage: 1 in flight + fp32 logits over the padded vocab


def test_mla_kv_cache_by_hand():
    # 671B, 64 nodes, TP 8 -> DP 64. The engine's paged pool (rl/trainer.build_engine, inference/engine.py): rows =
    # min(generation.max_batch_size 64, 32 prompts × 16 answers) = 64, each ceil((1024 + 8192 + 1) / 16) = 577
    # blocks of 16 tokens, plus the scratch block.
    overrides = ("stage=grpo", "model.preset=deepseek_v3", "model.seq_length=9216", "rl.max_prompt_length=1024",
                 "rl.max_response_length=8192", "rl.mini_batch_size=512", "training.global_batch_size=512",
                 "training.micro_batch_size=1", "parallel.tensor_model_parallel_size=8",
                 "parallel.expert_model_parallel_size=64", "parallel.expert_tensor_parallel_size=8")
    c = cfg(*overrides)
    plan = plan_memory(c, nodes=64)
    tokens = (64 * 577 + 1) * 16
    assert plan.kv_cache_tokens_per_gpu == tokens
    assert plan.per_gpu_gb["kv_cache"] == round(tokens * 61 * (512 + 64) * 2 / GIB, 3)
    # a budget: as many blocks as the engine makes of it (paged_cache.blocks_for_memory), 61 layers of bf16 latents
    from megatron_r1.inference.paged_cache import blocks_for_memory

    budget = plan_memory(cfg(*overrides, "generation.kv_cache_memory_gb=12"), nodes=64)
    blocks = blocks_for_memory(12, 16, 61 * (512 + 64) * 2)
    assert budget.kv_cache_tokens_per_gpu == blocks * 16 and abs(budget.per_gpu_gb["kv_cache"] - 12) < 1e-3
    fixed = plan_memory(cfg(*overrides, "generation.kv_cache_blocks=1000", "generation.kv_block_size=32"), nodes=64)
    assert fixed.kv_cache_tokens_per_gpu == 32_000
    assert plan.per_gpu_gb["reference_model"] == plan.per_gpu_gb["parameters"]  # kl_coef > 0, not offloaded
    off = plan_memory(load_config(None, ["rl.reference_offload=true"]), nodes=1, gpus_per_node=1)
    assert off.per_gpu_gb["reference_model"] == 0


def test_gqa_kv_cache_by_hand():
    # Llama-3.1-8B shape: 8 KV groups of 128; TP 2 -> 4 groups per rank; 1000 tokens overridden.
    c = cfg("stage=grpo", "model.preset=llama", "parallel.tensor_model_parallel_size=2")
    plan = plan_memory(c, nodes=1, gpus_per_node=2, kv_cache_tokens=1000)
    assert plan.per_gpu_gb["kv_cache"] == round(1000 * 32 * 2 * 4 * 128 * 2 / GIB, 3)


def test_fits_flag_follows_gpu_memory():
    c = cfg("model.preset=deepseek_v3_tiny")
    assert plan_memory(c, nodes=1, gpus_per_node=1, gpu_memory_gb=80).fits
    assert not plan_memory(c, nodes=1, gpus_per_node=1, gpu_memory_gb=1).fits  # 4 GiB overhead alone


def test_plan_rejects_bad_world_naming_the_field():
    c = cfg("model.preset=deepseek_v3_tiny", "parallel.tensor_model_parallel_size=4")
    with pytest.raises(ConfigError, match="parallel: world size 6"):
        plan_memory(c, nodes=1, gpus_per_node=6)


def test_cli_json(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: deepseek_v3}\nparallel: {tensor_model_parallel_size: 8, "
                    "expert_model_parallel_size: 64, expert_tensor_parallel_size: 8, use_distributed_optimizer: true}\n"
                    "training: {micro_batch_size: 1, global_batch_size: 512}\n")
    assert plan_main([str(path), "--nodes", "64", "--json", "--recompute"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 670.5e9 < out["total_params"] < 671.5e9
    assert 36.5e9 < out["active_params_per_token"] < 38e9
    comps = {"parameters", "gradients", "optimizer", "activations", "kv_cache", "reference_model", "overhead"}
    assert set(out["per_gpu_gb"]) == comps | {"total"}
    assert out["per_gpu_gb"]["total"] == pytest.approx(sum(out["per_gpu_gb"][k] for k in comps), abs=0.01)
    assert isinstance(out["fits"], bool)
    assert out["recompute"] is True


def test_cli_text_and_user_error(tmp_path, capsys):
    from megatron_r1.cli import main as top

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: deepseek_v3_tiny}\n")
    assert top(["plan", str(path), "--nodes", "1", "--gpus-per-node", "1"]) == 0
    assert "fits" in capsys.readouterr().out
    assert top(["plan", str(path), "parallel.tensor_model_parallel_size=3"]) == 2
    assert "parallel.tensor_model_parallel_size" in capsys.readouterr().err


def test_moe_layer_activation_elements_by_hand():
    # deepseek_v3_tiny layer 1 (MoE): h 256, 4 heads, q_lora 96, kv_lora 64, qk 32 + 16, v 32, 4 experts top-2 of
    # width 384, shared expert 384.
    c = cfg("model.preset=deepseek_v3_tiny")
    attn = (2 * 256 + 2 * 96 + (64 + 16) + 64
            + 4 * 48 + 4 * (32 + 32) + 2 * 4 * 48 + 2 * 4 * 32)  # q_up, kv_up outputs; q, k, v, attention output
    moe = 2 * 256 + 2 * 2 * 4 + 2 * (2 * 256 + 3 * 384) + 3 * 384
    assert layer_activation_elements(c, 1, tp=1) == attn + moe
    # TP 2 and expert TP 2: head-sharded and token-split terms halve, MLA latents do not; each expert rank sees
    # both TP ranks' tokens at full hidden width.
    attn2 = (2 * 256) / 2 + 2 * 96 + (64 + 16) + 64 + (4 * 48 + 4 * 64 + 2 * 4 * 48 + 2 * 4 * 32) / 2
    moe2 = (2 * 256 + 2 * 2 * 4 + 2 * (2 * 256 * 2 + 3 * 384) + 3 * 384) / 2
    assert layer_activation_elements(c, 1, tp=2, etp=2) == attn2 + moe2
