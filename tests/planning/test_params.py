"""Parameter counts: explicit hand arithmetic (written out here, not derived from the implementation) for the tiny
and the real DeepSeek-V3 shapes, and the real Megatron model as the independent reference."""
import pytest

from megatron_r1.config import load_config
from megatron_r1.planning import count_params
from megatron_r1.planning.params import stage_params_per_gpu


def model(preset, *overrides):
    return load_config(None, [f"model.preset={preset}", *overrides]).model


# Embedding/output rows as the model builder pads them: the config's rule (owned by megatron_r1.config), not ours.
TINY_ROWS = model("deepseek_v3_tiny").padded_vocab_size()
V3_ROWS_TP8 = model("deepseek_v3").padded_vocab_size(8)


# ----------------------------------------------------------------------------------------------- tiny, by hand
# deepseek_v3_tiny: h 256, vocab 512, 4 layers (first dense, FFN 768), 4 heads, MLA q_lora 96 kv_lora 64,
# qk 32 + rope 16, v 32, 4 routed experts (FFN 384) + 1 shared (384), untied embeddings.
TINY_ATTN = (256  # input RMSNorm
             + 256 * 96 + 96 + 96 * 4 * (32 + 16)  # q down, q norm, q up
             + 256 * (64 + 16) + 64 + 64 * 4 * (32 + 32)  # kv down (+ shared rope key), kv norm, kv up (k_nope, v)
             + 4 * 32 * 256)  # output projection
TINY_DENSE_LAYER = TINY_ATTN + 256 + 3 * 256 * 768
TINY_MOE_DENSE_PART = TINY_ATTN + 256 + 4 * 256 + 3 * 256 * 384  # norm, router, shared expert
TINY_EXPERTS = 4 * 3 * 256 * 384
TINY_MAIN = 2 * 512 * 256 + TINY_DENSE_LAYER + 3 * (TINY_MOE_DENSE_PART + TINY_EXPERTS) + 256


def test_tiny_by_hand():
    c = count_params(model("deepseek_v3_tiny"))
    assert c.main == TINY_MAIN == 5_732_224
    assert c.trainable == TINY_MAIN  # no MTP in the tiny preset
    assert c.expert_bias == 3 * 4
    # top-2 of 4 experts active: two experts' worth of each MoE layer is idle per token
    assert c.active_per_token == TINY_MAIN - 3 * 2 * 3 * 256 * 384


def test_tiny_mtp_by_hand():
    c = count_params(model("deepseek_v3_tiny", "model.mtp_num_layers=1"))
    mtp = 256 + 256 + 2 * 256 * 256 + 256 + TINY_MOE_DENSE_PART + TINY_EXPERTS  # enorm, hnorm, eh_proj, final norm
    assert c.mtp.total == mtp
    assert c.trainable == TINY_MAIN + mtp
    assert c.hf_checkpoint == TINY_MAIN + mtp + 4 * 4 + 2 * 512 * 256  # + biases + the HF embedding/head copies


# ----------------------------------------------------------------------------------------------- 671B, by hand
V3_ATTN = (7168
           + 7168 * 1536 + 1536 + 1536 * 128 * (128 + 64)
           + 7168 * (512 + 64) + 512 + 512 * 128 * (128 + 128)
           + 128 * 128 * 7168)
V3_DENSE_LAYER = V3_ATTN + 7168 + 3 * 7168 * 18432
V3_EXPERT = 3 * 7168 * 2048
V3_MOE_SHARED_PART = V3_ATTN + 7168 + 256 * 7168 + 3 * 7168 * 2048
V3_EMBED = 129280 * 7168
V3_MAIN = 2 * V3_EMBED + 3 * V3_DENSE_LAYER + 58 * (V3_MOE_SHARED_PART + 256 * V3_EXPERT) + 7168
V3_MTP = 3 * 7168 + 2 * 7168 * 7168 + V3_MOE_SHARED_PART + 256 * V3_EXPERT
V3_ACTIVE = 2 * V3_EMBED + 3 * V3_DENSE_LAYER + 58 * (V3_MOE_SHARED_PART + 8 * V3_EXPERT) + 7168


def test_deepseek_v3_by_hand():
    c = count_params(model("deepseek_v3"))
    assert c.main == V3_MAIN
    assert c.mtp.total == V3_MTP
    assert c.active_per_token == V3_ACTIVE
    # Public figures: 671B main model, 37B activated; the HF checkpoint holds 685B (671B + 14B MTP module, which
    # stores its own embedding and output head).
    assert 670.5e9 < c.main < 671.5e9
    assert 36.5e9 < c.active_per_token < 38e9
    assert c.hf_checkpoint == V3_MAIN + V3_MTP + 59 * 256 + 2 * V3_EMBED
    assert 684e9 < c.hf_checkpoint < 685.5e9
    assert 13e9 < c.hf_checkpoint - c.main < 14.5e9  # "14B MTP"


def test_deepseek_v3_largest_stage_by_hand():
    # TP 8, PP 1, EP 64 × expert TP 8 (the examples' RL layout): every GPU holds all 61 layers + MTP.
    m = model("deepseek_v3")
    p = load_config(None, ["model.preset=deepseek_v3", "parallel.tensor_model_parallel_size=8",
                           "parallel.expert_model_parallel_size=64", "parallel.expert_tensor_parallel_size=8"]).parallel
    attn = (7168 + 7168 * 1536 + 1536 + 7168 * 576 + 512  # replicated: norms and MLA down projections
            + (1536 * 128 * 192 + 512 * 128 * 256 + 128 * 128 * 7168) // 8)
    dense_layer = attn + 7168 + 3 * 7168 * 18432 // 8
    moe_dense = attn + 7168 + 256 * 7168 + 3 * 7168 * 2048 // 8
    moe_expert = (256 // 64) * 3 * 7168 * 2048 // 8
    assert V3_ROWS_TP8 >= 129280 and V3_ROWS_TP8 % 8 == 0
    vocab_shard = V3_ROWS_TP8 // 8 * 7168
    s = stage_params_per_gpu(m, p, 0)
    assert s.expert == 59 * moe_expert
    assert s.dense == (2 * vocab_shard + 3 * dense_layer + 59 * moe_dense + 7168
                       + 3 * 7168 + 2 * 7168 * 7168)


def test_tiny_pipeline_stages_with_mtp_by_hand():
    cfg = load_config(None, ["model.preset=deepseek_v3_tiny", "model.mtp_num_layers=1",
                             "parallel.pipeline_model_parallel_size=2"])
    first = stage_params_per_gpu(cfg.model, cfg.parallel, 0)
    last = stage_params_per_gpu(cfg.model, cfg.parallel, 1)
    assert first.total == TINY_ROWS * 256 + TINY_DENSE_LAYER + TINY_MOE_DENSE_PART + TINY_EXPERTS
    mtp = 3 * 256 + 2 * 256 * 256 + TINY_MOE_DENSE_PART + TINY_EXPERTS
    # layers 2-3, final norm, output layer, MTP module, and the MTP's copy of the embedding
    assert last.total == 2 * (TINY_MOE_DENSE_PART + TINY_EXPERTS) + 256 + TINY_ROWS * 256 + mtp + TINY_ROWS * 256


def test_padded_counts_add_the_builders_padding_rows():
    c = count_params(model("deepseek_v3_tiny"), padded=True)
    assert c.trainable == TINY_MAIN + 2 * (TINY_ROWS - 512) * 256  # embedding and output padded
    v3_rows = model("deepseek_v3").padded_vocab_size()
    assert count_params(model("deepseek_v3"), padded=True).main == V3_MAIN + 2 * (v3_rows - 129280) * 7168


# ----------------------------------------------------------------------------------------------- vs Megatron
def _megatron_counts(rank, world_size, cases):
    """Per-rank parameter and expert-bias counts of real Megatron models for each (preset overrides, layout)."""
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel
    from megatron_r1.parallel.runtime import current_context

    out = []
    for overrides in cases:
        cfg = load_config(None, [*overrides, "training.precision=fp32"])
        init_parallel(cfg.parallel)
        net = build_model(cfg.model, cfg.parallel, "fp32")
        params = sum(p.numel() for p in net.parameters())
        bias = sum(b.numel() for n, b in net.named_buffers() if n.endswith("expert_bias"))
        out.append((params, bias, current_context().pp_rank))
    return out


SINGLE = [
    ["model.preset=deepseek_v3_tiny"],
    ["model.preset=deepseek_v3_tiny", "model.mtp_num_layers=1"],
    ["model.preset=qwen2_tiny"],  # GQA with QKV bias, tied embeddings
    ["model.preset=llama_tiny", "model.untie_embeddings_and_output_weights=true"],
]


@pytest.mark.slow
def test_counts_equal_megatron_model_single_process():
    from tests.distributed import run_distributed

    [results] = run_distributed(_megatron_counts, 1, SINGLE)
    for overrides, (params, bias, _) in zip(SINGLE, results):
        c = count_params(load_config(None, overrides).model, padded=True)
        assert c.trainable == params, overrides
        assert c.expert_bias == bias, overrides


SHARDED = [
    # PP 2: embedding on stage 0, final norm + output on stage 1. (With MTP, Megatron's last stage also builds an
    # embedding and moves it with `.cuda()`, which the CPU bridges do not cover yet: hand-checked below instead.)
    ["model.preset=deepseek_v3_tiny", "parallel.pipeline_model_parallel_size=2"],
    # EP 2: two of four experts per rank
    ["model.preset=deepseek_v3_tiny", "parallel.expert_model_parallel_size=2"],
    # TP 2 on a dense GQA model: heads, query groups, MLP and vocab split
    ["model.preset=qwen2_tiny", "parallel.tensor_model_parallel_size=2"],
    # TP 2 with MLA and MoE: up projections, shared expert and vocab split; EP 2 or expert-TP 2 for the experts
    ["model.preset=deepseek_v3_tiny", "parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2"],
    ["model.preset=deepseek_v3_tiny", "parallel.tensor_model_parallel_size=2",
     "parallel.expert_tensor_parallel_size=2"],
]


@pytest.mark.slow
def test_per_gpu_counts_equal_megatron_shards():
    from tests.distributed import run_distributed

    per_rank = run_distributed(_megatron_counts, 2, SHARDED)
    for i, overrides in enumerate(SHARDED):
        cfg = load_config(None, overrides)
        for params, _, pp_rank in (r[i] for r in per_rank):
            planned = stage_params_per_gpu(cfg.model, cfg.parallel, pp_rank)
            assert planned.total == params, (overrides, pp_rank)


def test_mla_down_projections_are_replicated_over_tp():
    one = load_config(None, ["model.preset=deepseek_v3_tiny"])
    two = load_config(None, ["model.preset=deepseek_v3_tiny", "parallel.tensor_model_parallel_size=2"])
    from megatron_r1.planning.params import attention_params_per_gpu

    down = 256 * 96 + 256 * (64 + 16)  # q down + kv down (with the rope key)
    norms = 256 + 96 + 64
    full = attention_params_per_gpu(one.model, 1)
    assert attention_params_per_gpu(two.model, 2) == down + norms + (full - down - norms) // 2


def test_uneven_pipeline_stages_follow_the_config():
    from megatron_r1.config import load_config
    from megatron_r1.planning.params import stage_layers

    cfg = load_config(None, ["model.preset=deepseek_v3", "parallel.pipeline_model_parallel_size=16",
                             "parallel.num_layers_in_first_pipeline_stage=1"])
    ranges = [stage_layers(cfg.model, 16, s, cfg.parallel) for s in range(16)]
    assert ranges[0] == range(0, 1) and ranges[1] == range(1, 5) and ranges[-1] == range(57, 61)
    assert sum(len(r) for r in ranges) == 61
