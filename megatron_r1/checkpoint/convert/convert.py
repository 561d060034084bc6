"""HF <-> Megatron checkpoint conversion: the two directions, atomic output, multi-rank HF -> Megatron.

Megatron side (the layout of megatron_r1.checkpoint.layout, so `checkpoint.load=DIR` loads it):

    DIR/latest                  "iter_0000000"
    DIR/iter_0000000/           dist_checkpointing of {"model": model.sharded_state_dict()} (layout-free: loads
                                at any TP/PP/EP) + config.yaml (model section, training.precision)
    DIR/hf/                     the source's config.json, tokenizer and generation files, tensor_dtypes.json:
                                what the way back to HF needs and our config does not hold

Memory: HF -> Megatron holds one copy of each rank's model shard plus one global tensor at a time (tp×pp×ep
ranks split the model); Megatron -> HF holds the whole model once (TP=1) plus one output shard
(--max-shard-size) at a time. Never two full copies of the model.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_r1.checkpoint import load_model_only, save_model_only
from megatron_r1.checkpoint.convert.hf_config import detect_arch, hf_config_from_model, model_config_from_hf
from megatron_r1.checkpoint.convert.hf_io import HFCheckpoint, ShardedWriter, copy_assets, parse_size
from megatron_r1.checkpoint.convert.mapping import HFOptions
from megatron_r1.checkpoint.convert.weights import count_rules, iter_hf_tensors, load_hf_into_model
from megatron_r1.checkpoint.layout import iteration_dir_name, latest_checkpoint, write_latest
from megatron_r1.config import Config, ModelConfig, ParallelConfig, config_from_dict, read_yaml, validate
from megatron_r1.data.tokenizer import HFTokenizer
from megatron_r1.errors import CheckpointError, UserError
from megatron_r1.models import build_model
from megatron_r1.parallel import init_parallel
from megatron_r1.parallel.runtime import _free_port

HF_DIR = "hf"
DTYPES_FILE = "tensor_dtypes.json"
CONFIG_FILE = "config.yaml"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


# ------------------------------------------------------------------------------------------ output handling
def _disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, force: bool):
    """Yield a temporary directory beside `target`; it becomes `target` only if the block succeeds.

    On any failure the temporary directory is removed, so `target` is either the complete new output, the
    untouched old one, or absent. Disk full is reported as such.
    """
    target = Path(target)
    if target.exists() and not force:
        raise CheckpointError(f"{target}: already exists (pass --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        if _disk_full(e):
            raise CheckpointError(f"{target}: disk full while writing; nothing was written ({e})") from None
        if isinstance(e, OSError):
            raise CheckpointError(f"{target}: write failed, nothing was written ({e})") from None
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


# ------------------------------------------------------------------------------------------ checkpoint files
def _results_queue_without_reimport() -> None:
    # The torch_dist writer starts a multiprocessing Manager with *spawn*, which re-imports `__main__`: a script
    # that calls us without an `if __name__ == "__main__":` guard would re-run itself and the save would die
    # (docs/mcore_cpu.md, dist_checkpointing). A fork-started Manager serves the same queue without the re-import.
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def save_model(model, iter_dir: Path) -> None:
    """Save the weights as a dist checkpoint with the checkpoint package (collective over the model's ranks)."""
    _results_queue_without_reimport()
    save_model_only(model, iter_dir)


def load_model(model, iter_dir: Path) -> None:
    """Load the weights into `model` at whatever layout it was built with (resharding)."""
    load_model_only(model, iter_dir)


def write_model_config(iter_dir: Path, m: ModelConfig, precision: str) -> None:
    data = {"model": asdict(m), "training": {"precision": precision}}
    (iter_dir / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))


def read_model_config(iter_dir: Path) -> tuple[ModelConfig, str]:
    """(model config, precision) saved beside a Megatron checkpoint."""
    for path in (iter_dir / CONFIG_FILE, iter_dir.parent / CONFIG_FILE):
        if path.is_file():
            data = read_yaml(path)
            precision = (data.get("training") or {}).get("precision", "fp32")
            cfg = config_from_dict({"model": data.get("model") or {}}, source=str(path))
            return cfg.model, "fp32" if precision == "auto" else precision
    raise CheckpointError(f"{iter_dir}: no {CONFIG_FILE} beside the checkpoint (the model config is needed)")


def resolve_mcore_dir(path: str | os.PathLike) -> Path:
    """The iteration directory of a Megatron checkpoint given its root (with `latest`) or the directory itself."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: Megatron checkpoint directory not found")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: not a Megatron checkpoint (no `latest` file and no metadata.json)")
    return found


# ------------------------------------------------------------------------------------------ HF -> Megatron
@dataclass
class _Job:
    hf_dir: str
    iter_dir: str
    model: dict
    opts: dict
    parallel: dict
    precision: str
    progress: bool
    source: str = "hf"  # hf: read HF safetensors | mcore: load a Megatron checkpoint (resharding)


def _precision_of(hf: HFCheckpoint) -> tuple[str, dict[str, str]]:
    """fp32 or bf16 to hold the weights losslessly, and each tensor's HF dtype (for the way back)."""
    dtypes = {}
    for name in hf.names():
        code = hf._handle(name).get_slice(name).get_dtype()
        dtypes[name] = _SAFETENSORS_DTYPES.get(code, code.lower())
    # The router's expert bias is fp32 in both HF and Megatron; the rest decides.
    floats = {d for n, d in dtypes.items() if d.startswith(("float", "bfloat")) and "e_score_correction" not in n}
    return ("bf16" if floats == {"bfloat16"} else "fp32"), dtypes


def _convert_rank(job: _Job) -> int:
    pcfg = ParallelConfig(**job.parallel)
    init_parallel(pcfg)
    m = ModelConfig(**job.model)
    model = build_model(m, pcfg, job.precision)
    n = 0
    if job.source == "mcore":
        load_model(model, Path(job.hf_dir))
    else:
        with HFCheckpoint(job.hf_dir) as hf:
            n = load_hf_into_model(model, hf, m, HFOptions(**job.opts), progress=job.progress)
    save_model(model, Path(job.iter_dir))
    return n


def _rank_entry(rank: int, world: int, port: int, job: _Job, err_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        if rank != 0:
            job.progress = False
        _convert_rank(job)
    except BaseException as e:
        Path(err_dir, f"rank{rank}").write_text(f"{type(e).__name__}: {e}" if isinstance(e, UserError) or _disk_full(e)
                                                else __import__("traceback").format_exc())
        raise SystemExit(1) from e
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(job: _Job, world: int) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as err_dir:
        port = _free_port()
        procs = [ctx.Process(target=_rank_entry, args=(r, world, port, job, err_dir)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        errors = sorted(Path(err_dir).iterdir())
        if errors or any(p.exitcode != 0 for p in procs):
            text = errors[0].read_text() if errors else f"a rank exited with {[p.exitcode for p in procs]}"
            if "No space left on device" in text:
                raise OSError(errno.ENOSPC, text)
            raise CheckpointError(f"conversion failed on {errors[0].name if errors else 'a rank'}: {text.strip()}")


def _target_layout(m: ModelConfig, tp: int, pp: int, ep: int) -> dict:
    """The ParallelConfig fields of the layout a conversion writes (expert TP 1), checked against the model."""
    parallel = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                    expert_tensor_parallel_size=1)
    validate(Config(model=m, parallel=ParallelConfig(**parallel)), world_size=tp * pp * ep,
             source="--tp/--pp/--ep")
    return parallel


def convert_hf_to_mcore(load: str | os.PathLike, save: str | os.PathLike, model: Optional[str] = None,
                        tp: int = 1, pp: int = 1, ep: int = 1, force: bool = False, progress: bool = True) -> Path:
    """Convert the HF checkpoint in `load` to a Megatron checkpoint directory `save`; returns `save`.

    The dist checkpoint is written by tp×pp×ep ranks (spawned here when more than one), each holding only its
    shard; it can be loaded at any other layout.
    """
    t0 = time.time()
    with HFCheckpoint(load) as hf:
        arch = detect_arch(hf.config, str(hf.path / "config.json"))
        if model is not None and model != arch:
            raise CheckpointError(f"{hf.path}: --model {model} but config.json describes {arch}")
        n_layers = hf.config.get("num_hidden_layers", 0)
        has_mtp = any(n.startswith(f"model.layers.{n_layers}.") for n in hf.names())
        m, opts = model_config_from_hf(hf.config, str(hf.path / "config.json"), has_mtp=has_mtp)
        precision, dtypes = _precision_of(hf)
    parallel = _target_layout(m, tp, pp, ep)
    with atomic_output(save, force) as tmp:
        hf_out = tmp / HF_DIR
        hf_out.mkdir()
        shutil.copy2(Path(load) / "config.json", hf_out / "config.json")
        copy_assets(Path(load), hf_out)
        (hf_out / DTYPES_FILE).write_text(json.dumps(dtypes, indent=1) + "\n")

        iter_dir = tmp / iteration_dir_name(0)
        job = _Job(str(load), str(iter_dir), asdict(m), asdict(opts), parallel, precision, progress)
        world = tp * pp * ep
        if world == 1:
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() > 1:
                raise CheckpointError("convert: call from a single process (it launches its own ranks)")
            _convert_rank(job)
        else:
            _run_ranks(job, world)
        if not iter_dir.is_dir():
            raise CheckpointError(f"{save}: the ranks finished without writing {iter_dir.name}")
        write_model_config(iter_dir, m, precision)
        write_latest(tmp, iter_dir.name)
    if progress:
        print(f"converted {load} -> {save} ({m.arch}, TP{tp} PP{pp} EP{ep}, {precision}) in {time.time() - t0:.1f}s")
    return Path(save)


def reshard_mcore(load: str | os.PathLike, save: str | os.PathLike, tp: int = 1, pp: int = 1, ep: int = 1,
                  force: bool = False) -> Path:
    """Rewrite a Megatron checkpoint from tp×pp×ep ranks (its files as that layout writes them).

    Any layout can load any dist checkpoint directly (dist_checkpointing reshards at load time); this is for
    tools that want a checkpoint written at a given layout, and it checks that the layout fits the model.
    """
    src = resolve_mcore_dir(load)
    m, precision = read_model_config(src)
    parallel = _target_layout(m, tp, pp, ep)

    with atomic_output(save, force) as tmp:
        for assets in (src / HF_DIR, src.parent / HF_DIR):
            if assets.is_dir():
                shutil.copytree(assets, tmp / HF_DIR)
                break
        iter_dir = tmp / iteration_dir_name(0)
        job = _Job(str(src), str(iter_dir), asdict(m), {}, parallel, precision, False, source="mcore")
        if tp * pp * ep == 1:
            _convert_rank(job)
        else:
            _run_ranks(job, tp * pp * ep)
        write_model_config(iter_dir, m, precision)
        write_latest(tmp, iter_dir.name)
    return Path(save)


# ------------------------------------------------------------------------------------------ Megatron -> HF
def load_mcore_model(load: str | os.PathLike, precision: Optional[str] = None):
    """(model, ModelConfig) of a Megatron checkpoint loaded into one process at TP=1/PP=1/EP=1."""
    iter_dir = resolve_mcore_dir(load)
    m, saved_precision = read_model_config(iter_dir)
    pcfg = ParallelConfig()
    init_parallel(pcfg)
    model = build_model(m, pcfg, precision or saved_precision)
    load_model(model, iter_dir)
    return model, m


def _special_token_ids(hf_config: dict, out: Path) -> None:
    """bos/eos/pad ids that the exported config.json lacks (a model trained here, not converted) from the
    exported tokenizer, and a generation_config.json with them: HF `generate` stops at EOS only if told."""
    if not (out / "tokenizer.json").is_file() or (hf_config.get("eos_token_id") is not None
                                                  and (out / "generation_config.json").is_file()):
        return
    tok = HFTokenizer(out)
    for key, tid in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)):
        if hf_config.get(key) is None and tid is not None:
            hf_config[key] = tid
    if not (out / "generation_config.json").is_file():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if hf_config.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def convert_mcore_to_hf(load: str | os.PathLike, save: str | os.PathLike, model: Optional[str] = None,
                        max_shard_size: str | int = "5GB", force: bool = False, progress: bool = True) -> Path:
    """Convert the Megatron checkpoint `load` (root with `latest`, or an iteration directory) to HF in `save`."""
    from tqdm import tqdm

    t0 = time.time()
    max_bytes = parse_size(max_shard_size)
    iter_dir = resolve_mcore_dir(load)
    m, precision = read_model_config(iter_dir)
    if model is not None and model != m.arch:
        raise CheckpointError(f"{load}: --model {model} but the checkpoint holds {m.arch}")
    if Path(save).exists() and not force:  # fail before the (slow) load
        raise CheckpointError(f"{save}: already exists (pass --force to replace it)")
    assets = next((d for d in (iter_dir / HF_DIR, iter_dir.parent / HF_DIR) if d.is_dir()), None)
    base = json.loads((assets / "config.json").read_text()) if assets and (assets / "config.json").is_file() else None
    dtypes = json.loads((assets / DTYPES_FILE).read_text()) if assets and (assets / DTYPES_FILE).is_file() else None
    opts = HFOptions(rope_interleave=bool((base or {}).get("rope_interleave", True))) \
        if m.arch == "deepseek_v3" else HFOptions(rope_interleave=False)
    net, _ = load_mcore_model(iter_dir, precision)
    out_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with atomic_output(save, force) as tmp:
        writer = ShardedWriter(tmp, max_bytes)
        total = count_rules(m, opts)
        for name, tensor in tqdm(iter_hf_tensors(net, m, opts, dtypes, out_dtype), total=total, desc="mcore -> hf",
                                 unit="tensor", disable=not progress):
            writer.add(name, tensor)
        writer.close()
        floats = {d for n, d in (dtypes or {}).items() if d.startswith(("float", "bfloat"))}
        dtype = floats.pop() if len(floats) == 1 else str(out_dtype).split(".")[-1]
        hf_config = hf_config_from_model(m, base, dtype)
        if assets is not None:
            copy_assets(assets, tmp)
        _special_token_ids(hf_config, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    del net
    if progress:
        print(f"converted {load} -> {save} ({m.arch}) in {time.time() - t0:.1f}s")
    return Path(save)
