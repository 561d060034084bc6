"""Data for the R1 recipe: templates, dataset readers, built-in generated tasks, tokenizers, demo pre-training text."""
from megatron_r1.data.loading import load_dataset
from megatron_r1.data.pretrain import pretrain_corpus
from megatron_r1.data.preview import preview
from megatron_r1.data.readers import Dataset, LoadReport
from megatron_r1.data.splits import split_of
from megatron_r1.data.tasks import TASKS, register_task
from megatron_r1.data.templates import Template, get_template
from megatron_r1.data.tokenizer import DemoTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Dataset", "DemoTokenizer", "HFTokenizer", "LoadReport", "TASKS", "Template", "Tokenizer", "get_template",
    "load_dataset", "load_tokenizer", "preview", "pretrain_corpus", "register_task", "split_of",
]
