"""The shared training step and the LM pre-training stage, in one process (gloo world of 1)."""
import math

import pytest
import torch

from megatron_r1.config import config_from_dict
from tests.distributed import run_distributed
from tests.presets import tiny_deepseek_v3

TINY = tiny_deepseek_v3(seq_length=96, max_position_embeddings=128)


def _corpus(path, n=400):
    docs = [f"User: {a}+{b}. Assistant: <answer> {a + b} </answer>" for a in range(20) for b in range(20)][:n]
    path.write_text("\n\n".join(docs))


def _pretrain(rank, world, tmp, steps):
    from megatron_r1.training.pretrain import run_pretrain

    cfg = config_from_dict({
        "stage": "pretrain", "model": TINY, "tokenizer": {"path": "builtin:demo"},
        "data": {"source": f"{tmp}/corpus.txt"},
        "training": {"train_steps": steps, "micro_batch_size": 8, "global_batch_size": 16, "seed": 3},
        "optimizer": {"lr": 3e-3, "lr_warmup_steps": 2},
        "logging": {"run_dir": f"{tmp}/run", "progress": False, "plots": True},
        "checkpoint": {"save": f"{tmp}/ckpt", "save_interval": 0},
    })
    return run_pretrain(cfg)


@pytest.mark.slow
def test_pretrain_lowers_the_loss_and_writes_everything(tmp_path):
    _corpus(tmp_path / "corpus.txt")
    (last,) = run_distributed(_pretrain, 1, str(tmp_path), 14)
    from megatron_r1.logging.metrics import read_metrics

    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 14
    assert losses[-1] < 0.7 * losses[0], losses
    assert last["tokens_per_s"] > 0 and math.isfinite(last["grad_norm"])
    assert any(k.startswith("moe/") for k in rows[-1])  # expert load and bias are logged
    assert (tmp_path / "ckpt" / "latest").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()


def _nan_step(rank, world):
    from megatron_r1.parallel import init_parallel
    from megatron_r1.training import build_train_state, train_step

    cfg = config_from_dict({"model": TINY, "training": {"micro_batch_size": 2, "global_batch_size": 2},
                            "optimizer": {"lr_warmup_steps": 0}})
    ctx = init_parallel(cfg.parallel, 1)
    state = build_train_state(cfg, ctx, 10)
    # Parameters, not buffers: the router's balancing bias follows token counts, which a NaN loss leaves valid.
    params = lambda: dict(state.unwrapped[0].named_parameters())  # noqa: E731
    before = {k: v.detach().clone() for k, v in params().items()}

    def forward_step(it, model, poison):
        tokens = torch.randint(0, 384, (2, 16))
        pos = torch.arange(16).expand(2, -1)
        out = model(tokens, pos, None, labels=tokens)

        def loss_func(o):
            loss = o.float().mean() * (float("nan") if poison else 1.0)
            return loss, {"loss": loss.detach()}

        return out, loss_func

    from functools import partial

    bad = train_step(state, partial(forward_step, poison=True), iter([None]), 1, 16, 2)
    same = all(torch.equal(before[k], v) for k, v in params().items())
    good = train_step(state, partial(forward_step, poison=False), iter([None]), 1, 16, 2)
    changed = any(not torch.equal(before[k], v) for k, v in params().items())
    return bad.skipped, same, good.skipped, changed, state.extra.get("skipped_steps")


@pytest.mark.slow
def test_nan_loss_skips_the_step_and_keeps_weights():
    bad_skipped, same, good_skipped, changed, count = run_distributed(_nan_step, 1)[0]
    assert bad_skipped and same and count == 1
    assert not good_skipped and changed
