"""Build examples/pipelines/tiny_student_tokenizer/: a 384-token byte-level BPE for the CPU pipeline's student.

The distillation stage is text-level: the student keeps its own tokenizer. On CPU the teacher uses the built-in demo
tokenizer, so the tiny student gets a different one (trained here on the same kind of text, offline, seeded by the
corpus) — a real test that no token ids cross from teacher to student. Re-run to regenerate:
    /work/venv/bin/python examples/pipelines/make_student_tokenizer.py
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_r1.data import pretrain_corpus
from megatron_r1.data.tasks import generate
from megatron_r1.reward_model.preferences import generate_preferences

OUT = Path(__file__).with_name("tiny_student_tokenizer")
SPECIALS = ["<pad>", "<eos>"]
# Tags are ordinary (non-special) added tokens: decode must keep them, or the format reward never sees them.
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def corpus() -> list[str]:
    texts = pretrain_corpus("demo_arithmetic", num_samples=400, seed=3)
    texts += [s["completion"] for s in generate("cold_start", num_samples=200, seed=3, source="arithmetic")]
    texts += [r["prompt"] + " " + r["chosen"] for r in generate_preferences(num_samples=200, seed=3)]
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384 - len(TAGS), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    OUT.mkdir(exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    special = {"eos_token": "<eos>", "pad_token": "<pad>"}
    (OUT / "tokenizer_config.json").write_text(json.dumps(special, indent=1) + "\n")
    print(f"{OUT}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
