"""rl.shared_prefix: a group packed as one row [prompt, answer_1..G] gives the same log-probs, gradients and training
as one padded row per answer (MLA + MoE and dense GQA rope; TP=2 with sequence parallelism; PP=2; the trainer)."""
import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.logging.metrics import read_metrics
from megatron_r1.rl.batch import RolloutBatch, collate, collate_shared_prefix, shared_prefix_mask
from tests.distributed import run_distributed
from tests.rl.common import TINY, grpo_config

G = 3
LLAMA = {"preset": "llama_tiny", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
         "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 384, "seq_length": 128,
         "max_position_embeddings": 160}
MODELS = {"deepseek_v3_tiny": TINY, "llama_tiny": LLAMA}


def rollouts(vocab: int = 300, seed: int = 0) -> RolloutBatch:
    """3 groups of G answers: prompts of 7, 3 and 11 tokens; answers of different lengths (1 to 9 tokens)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    prompts, responses = [], []
    for p_len, r_lens in ((7, (5, 1, 9)), (3, (4, 4, 2)), (11, (8, 3, 6))):
        prompt = rand(p_len)
        for r_len in r_lens:
            prompts.append(list(prompt))
            responses.append(rand(r_len))
    n = len(responses)
    return RolloutBatch(prompt_tokens=prompts, response_tokens=responses,
                        behavior_logprobs=[[-1.0] * len(r) for r in responses], texts=[""] * n, samples=[{}] * n,
                        finish_reasons=["stop"] * n, group_size=G,
                        advantages=torch.linspace(-1.0, 1.0, n))


def model_config(name: str, tp: int = 1):
    from megatron_r1.config import config_from_dict

    return config_from_dict({"stage": "grpo", "model": dict(MODELS[name]),
                             "parallel": {"tensor_model_parallel_size": tp},
                             "training": {"micro_batch_size": 2 * G, "global_batch_size": 2 * G,
                                          "precision": "fp32"},
                             "rl": {"group_size": G, "mini_batch_size": 3 * G, "prompts_per_step": 3,
                                    "kl_coef": 0.01, "shared_prefix": True},
                             "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "lr_warmup_steps": 0,
                                           "lr_decay_style": "constant", "adam_eps": 1e-3}}, [])


# ------------------------------------------------------------------------------------------------ the layout
def test_layout_positions_mask_and_targets():
    rb = rollouts()
    pb = collate_shared_prefix(rb, pad_id=0)
    assert pb.tokens.shape[0] == 3 and len(pb) == 9 and pb.labels is None
    # group 0: prompt 7, answers of 5, 1, 9 tokens -> inputs 4, 0, 8 tokens
    row = pb.position_ids[0]
    assert row[:7].tolist() == list(range(7))
    assert row[7:11].tolist() == [7, 8, 9, 10] and row[11:19].tolist() == list(range(7, 15))
    assert pb.response_index[0, :5].tolist() == [6, 7, 8, 9, 10]
    assert pb.response_index[1, :1].tolist() == [6]
    assert pb.response_index[2, :9].tolist() == [6] + list(range(11, 19))
    assert pb.response_labels[2, :9].tolist() == rb.response_tokens[2]
    # each answer's inputs hold its own tokens: the target of column c is the input at c + 1 within an answer
    assert pb.tokens[0, 11:19].tolist() == rb.response_tokens[2][:-1]
    # the model gets the O(S) segment mask [rows, 1, 1, S], not a dense [rows, 1, S, S] one
    assert pb.attention_mask.shape == (3, 1, 1, pb.tokens.shape[1]) and pb.attention_mask.dtype == torch.long
    assert torch.equal(pb.attention_mask[:, 0, 0], pb.segments)
    mask = shared_prefix_mask(pb.segments)[0, 0]  # what it stands for; True = masked
    assert torch.equal(mask[:7, :7], ~torch.ones(7, 7, dtype=torch.bool).tril())  # causal prompt
    assert not mask[11:19, :7].any()  # the third answer sees the whole prompt
    assert mask[11:19, 7:11].all()  # never the first answer
    assert not mask[12, 11:13].any() and mask[12, 13:].all()  # its own past only
    last = pb.tokens.shape[1] - 1  # padding (group 0 is shorter than group 2) sees only itself
    assert row.shape[0] > 19 and (~mask[last]).nonzero().flatten().tolist() == [last]
    assert mask[:19, 19:].all()  # nothing real sees padding


def test_sequence_tokens_count_each_answers_prompt_and_response_once():
    # prompts 7, 3, 11 tokens (3 answers each), responses 5+1+9, 4+4+2, 8+3+6 tokens
    assert rollouts().sequence_tokens() == 3 * (7 + 3 + 11) + (15 + 10 + 17)


def test_slices_keep_whole_groups():
    pb = collate_shared_prefix(rollouts(), pad_id=0)
    part = pb.slice(3, 9)
    assert len(part) == 6 and part.tokens.shape[0] == 2 and part.rows(6) == 2
    torch.testing.assert_close(part.response_labels, pb.response_labels[3:9])
    with pytest.raises(ValueError, match="whole groups"):
        pb.slice(0, 4)


def test_mask_needs_no_nan_rows():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1, -1]])
    assert (~shared_prefix_mask(seg)).any(-1).all()


def test_mini_batch_not_a_multiple_of_group_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="rl.mini_batch_size"):
        grpo_config(tmp_path, ["rl.shared_prefix=true", "rl.mini_batch_size=6", "rl.prompts_per_step=3",
                               "rl.group_size=4"])
    with pytest.raises(ConfigError, match="training.micro_batch_size"):
        grpo_config(tmp_path, ["rl.shared_prefix=true", "training.micro_batch_size=6",
                               "training.global_batch_size=12"])


def test_mini_batch_per_data_parallel_rank_must_hold_whole_groups(tmp_path):
    from megatron_r1.rl.trainer import check_shared_prefix

    cfg = grpo_config(tmp_path, ["rl.shared_prefix=true"])  # 16 answers, G=4
    check_shared_prefix(cfg, 2)
    with pytest.raises(ConfigError, match="rl.mini_batch_size"):
        check_shared_prefix(cfg, 8)  # 2 answers per rank


# ------------------------------------------------------------------------------ equal to the padded layout
def _step_both_ways(rank, world, name, tp, init_dir):
    """Log-probs, and one GRPO train_step's gradients and updated weights, for the padded and the packed batch
    from the same initial weights."""
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.models.builder import build_model
    from megatron_r1.models.prefix_attention import calls
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl.policy_forward import compute_logprobs, hidden_mode, make_policy_loss_step, micro_batches
    from megatron_r1.training.setup import build_train_state, unwrap
    from megatron_r1.training.step import train_step

    cfg = model_config(name, tp)
    ctx = init_parallel(cfg.parallel, 3)
    if init_dir is None:
        init = {k: v.clone() for k, v in build_model(cfg.model, cfg.parallel, "fp32").state_dict().items()
                if isinstance(v, torch.Tensor)}
    rb = rollouts(vocab=cfg.model.vocab_size)
    mbs = cfg.training.micro_batch_size  # 2 groups: two micro-batches, the last one partial
    out = {}
    for mode, fn in (("plain", collate), ("packed", collate_shared_prefix)):
        pb = fn(rb, pad_id=0, pad_multiple=tp)
        calls.clear()
        state = build_train_state(cfg, ctx, 10)
        model = unwrap(state.model[0])
        if init_dir is None:
            model.load_state_dict(init, strict=False)
        else:
            load_model_only(model, init_dir)
        lp = compute_logprobs(state.model, pb, mbs, 0.9, ctx.device)
        pb.ref_logprobs = lp - 0.05 * torch.arange(lp.shape[1], dtype=lp.dtype)  # a KL term with gradients
        n_micro = -(-len(pb) // mbs)
        with hidden_mode(state.model):
            result = train_step(state, make_policy_loss_step(cfg.rl, 0.9), micro_batches(pb, mbs, ctx.device),
                                n_micro, pb.tokens.shape[1], pb.rows(mbs))
        none = [n for n, p in model.named_parameters() if p.requires_grad and p.main_grad is None]
        assert not none, none
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        out[mode] = {"logprobs": lp * pb.response_mask, "grads": grads, "weights": weights, "loss": result.loss,
                     "grad_norm": result.grad_norm, "attention": dict(calls)}
    return out


def _assert_same(out):
    plain, packed = out["plain"], out["packed"]
    # packed rows ran through block attention only: 2 layers, 2 micro-batches of log-probs and 2 of training
    assert packed["attention"] == {"blocks": 8} and "blocks" not in plain["attention"], out
    torch.testing.assert_close(packed["logprobs"], plain["logprobs"], rtol=0, atol=2e-5)
    assert abs(packed["loss"] - plain["loss"]) < 1e-5 and plain["grad_norm"] > 1e-3
    assert plain["grads"].keys() == packed["grads"].keys()
    for k, g in plain["grads"].items():
        scale = float(g.abs().max())
        assert float((packed["grads"][k] - g).abs().max()) <= 1e-5 * scale + 1e-9, k
    for k, w in plain["weights"].items():
        torch.testing.assert_close(packed["weights"][k], w, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_groups_give_the_padded_layouts_logprobs_and_gradients(name):
    (out,) = run_distributed(_step_both_ways, 1, name, 1, None)
    _assert_same(out)


def _save_init(rank, world, tmp):
    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.models.builder import build_model
    from megatron_r1.parallel import init_parallel

    cfg = model_config("deepseek_v3_tiny")
    init_parallel(cfg.parallel, 3)
    save_model_only(build_model(cfg.model, cfg.parallel, "fp32"), f"{tmp}/init")


@pytest.mark.slow
def test_packed_groups_at_tp2_with_sequence_parallelism(tmp_path):
    run_distributed(_save_init, 1, str(tmp_path))
    outs = run_distributed(_step_both_ways, 2, "deepseek_v3_tiny", 2, f"{tmp_path}/init")
    for out in outs:
        _assert_same(out)


def _logprobs_pp2(rank, world, init_dir):
    """Reference/old log-probs through a 2-stage pipeline: every stage reads the positions and the mask from the
    micro-batch."""
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.models.builder import build_model
    from megatron_r1.models.prefix_attention import calls
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl.policy_forward import compute_logprobs

    cfg = model_config("deepseek_v3_tiny")
    cfg.parallel.pipeline_model_parallel_size = 2
    ctx = init_parallel(cfg.parallel, 3)
    model = build_model(cfg.model, cfg.parallel, "fp32")
    load_model_only(model, init_dir)
    rb = rollouts(vocab=cfg.model.vocab_size)
    plain = compute_logprobs([model], collate(rb, pad_id=0), 2 * G, 0.9, ctx.device)
    calls.clear()
    packed = compute_logprobs([model], collate_shared_prefix(rb, pad_id=0), 2 * G, 0.9, ctx.device)
    used = dict(calls)
    return used, None if plain is None else [lp * collate(rb, 0).response_mask for lp in (plain, packed)]


@pytest.mark.slow
def test_packed_groups_through_a_pipeline(tmp_path):
    run_distributed(_save_init, 1, str(tmp_path))
    (used0, first), (used1, last) = run_distributed(_logprobs_pp2, 2, f"{tmp_path}/init")
    assert first is None
    assert used0 == used1 == {"blocks": 2}, (used0, used1)  # 1 layer per stage, 2 micro-batches: blocks only
    plain, packed = last
    torch.testing.assert_close(packed, plain, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------- the trainer
def _run(rank, world, tmp, overrides):
    from megatron_r1.rl.trainer import run_grpo

    return run_grpo(grpo_config(tmp, overrides))


@pytest.mark.slow
def test_trainer_runs_with_shared_prefix_and_logs_the_same_metrics(tmp_path):
    common = ["training.train_steps=1", "rl.kl_coef=0.01", "rl.mini_batch_size=8", "training.micro_batch_size=4",
              "training.global_batch_size=4"]  # two mini-batches: old log-probs recomputed; two micro-batches
    (plain,) = run_distributed(_run, 1, str(tmp_path / "plain"), common)
    (packed,) = run_distributed(_run, 1, str(tmp_path / "packed"), common + ["rl.shared_prefix=true"])
    assert set(packed) == set(plain)
    assert packed["reward"] == plain["reward"]  # the same samples
    rows = read_metrics(tmp_path / "packed" / "run")
    assert rows and all(k in rows[-1] for k in ("loss", "kl", "entropy", "grad_norm", "train_tokens_per_s"))
