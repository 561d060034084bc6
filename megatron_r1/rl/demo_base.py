"""The demo's base model as a shippable asset: fp16 weights, the provenance of the pre-training that made them,
and its loss curve, in one directory (the package ships one in `megatron_r1/assets/demo_base/`).

Why a file of its own and not a training checkpoint: a checkpoint holds fp32 weights and Adam moments (~85 MB for
this model) in dist_checkpointing's layout; the asset holds the weights only, in fp16 (~14 MB), readable with
plain `safetensors`, and says how to rebuild it (`megatron-r1 demo --pretrain`). The demo turns it back into a
model-only checkpoint in its run directory, which every stage loads the usual way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_r1.errors import CheckpointError

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "demo_base"
WEIGHTS = "model.safetensors"
PROVENANCE = "provenance.json"
LOSS_CURVE = "loss_curve.png"
# Every weight of the tiny model is far inside fp16's range, and fp16 keeps 3 more mantissa bits than bf16.
STORAGE_DTYPE = torch.float16


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def weights_of(model) -> dict[str, torch.Tensor]:
    """The model's tensors (parameters and buffers such as the router's expert bias), without Megatron's extra
    state, in the storage dtype."""
    return {k: v.detach().to(STORAGE_DTYPE).contiguous() for k, v in _unwrap(model).state_dict().items()
            if isinstance(v, torch.Tensor)}


def shapes_of(weights: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sorted(weights.items())}


def write_base(model, out_dir: str | Path, provenance: dict) -> Path:
    """Write `model`'s weights (fp16 safetensors) and `provenance` (+ the shapes and parameter count) to `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = weights_of(model)
    for name, t in weights.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{name}: not representable in {STORAGE_DTYPE} (overflow); cannot ship the base")
    save_file(weights, str(out / WEIGHTS), metadata={"format": "megatron-r1 demo base", "dtype": "float16"})
    provenance = dict(provenance, dtype="float16", shapes=shapes_of(weights),
                      num_parameters=sum(p.numel() for p in _unwrap(model).parameters()))
    write_provenance(out, provenance)
    return out


def write_provenance(base_dir: str | Path, provenance: dict) -> None:
    (Path(base_dir) / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")


def read_provenance(base_dir: str | Path) -> dict:
    path = Path(base_dir) / PROVENANCE
    if not path.is_file():
        raise CheckpointError(f"{base_dir}: no {PROVENANCE}; not a demo base directory")
    return json.loads(path.read_text())


def load_base(model, base_dir: str | Path) -> dict:
    """Load the base's weights into `model` (cast to the model's dtype); returns its provenance.

    Every tensor of the model must be in the file with the same shape, and nothing else: a base made for another
    model config is refused with the names that differ."""
    from safetensors.torch import load_file

    base_dir = Path(base_dir)
    provenance = read_provenance(base_dir)
    path = base_dir / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    loaded = load_file(str(path))
    module = _unwrap(model)
    own = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    missing, extra = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
    wrong = sorted(k for k in set(own) & set(loaded) if own[k].shape != loaded[k].shape)
    if missing or extra or wrong:
        raise CheckpointError(f"{path}: does not match this model (missing {missing[:5]}, unexpected {extra[:5]}, "
                              f"other shape {wrong[:5]})")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(loaded[k].to(v.dtype))
    return provenance


def describe(provenance: dict) -> str:
    """A few lines saying what the base is and how it was made (printed by the demo)."""
    data = provenance.get("data", {})
    train = provenance.get("training", {})
    curve = provenance.get("loss_curve") or []
    lines = [
        f"  made by: {provenance.get('command', '?')}  ({provenance.get('minutes', '?')} min, "
        f"{provenance.get('made_on', '?')})",
        f"  model: {provenance.get('model', {}).get('preset', '?')}, {provenance.get('num_parameters', 0) / 1e6:.2f}M "
        f"parameters, stored as {provenance.get('dtype', '?')}",
        f"  pre-training: {train.get('train_steps', '?')} steps x {train.get('global_batch_size', '?')} windows, "
        f"seed {train.get('seed', '?')}, lr {provenance.get('optimizer', {}).get('lr', '?')}",
        f"  data: {data.get('source', '?')} {json.dumps(data.get('options', {}))}",
    ]
    if curve:
        lines.append(f"  loss: {curve[0][1]:.3f} (step {curve[0][0]}) -> {curve[-1][1]:.3f} (step {curve[-1][0]})")
    held = provenance.get("held_out")
    if held:
        lines.append("  held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in held.items() if isinstance(v, float)))
    return "\n".join(lines)
