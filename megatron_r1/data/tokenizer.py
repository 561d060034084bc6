"""Tokenizers behind one interface: the built-in demo tokenizer and HF `tokenizer.json` files.

An HF tokenizer directory also carries the model's chat template (`chat_template.jinja` or tokenizer_config.json's
`chat_template`); `HFTokenizer.apply_chat_template` renders it with transformers' own implementation, so prompts
built here are the ones HF builds for the same messages. `copy_tokenizer_files` is how checkpoints carry their
tokenizer forward (byte-identical files, not a re-serialisation).
"""
from __future__ import annotations

import abc
import json
import re
import shutil
import string
from pathlib import Path

from megatron_r1.data.templates import R1_ZERO
from megatron_r1.errors import ConfigError


class Tokenizer(abc.ABC):
    """What the trainer, inference engine and data code need from a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None: ...

    chat_template: str | None = None  # jinja text of the model's chat template, when it has one

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{"role", "content"}, ...]) through the model's chat template."""
        raise ConfigError("this tokenizer has no chat template (an HF tokenizer directory with chat_template.jinja "
                          "or tokenizer_config.json's chat_template has one)")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the chat template (special tokens in the text become their ids)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


DEMO_FILE = "demo_tokenizer.json"
_SPECIALS = ["<pad>", "<eos>", "<bos>"]
_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
# Words of the demo task's reasoning and of common prompts; the template's own words are added from its text.
_DEMO_WORDS = ("plus minus times is equals so the answer first then result add subtract multiply sum total "
               "Calculate What Using numbers create equation that equals")
_PADDING_MULTIPLE = 128
# Pieces: a tag, an optional space + letters, or one character; greedy on these keeps words whole.
_PIECE_RE = re.compile(r" ?</?[a-z]+>| ?[A-Za-z]+|.", re.DOTALL)


def _demo_vocab() -> list[str]:
    words = sorted(set(re.findall(r"[A-Za-z]+", R1_ZERO)) | set(_DEMO_WORDS.split()))
    tokens = _SPECIALS + _TAGS + [" " + t for t in _TAGS] + words + [" " + w for w in words]
    # Every ASCII character (printable first, for readable ids) so any ASCII text has a char-level fallback.
    chars = list(string.printable) + [chr(i) for i in range(128)]
    tokens += [c for c in dict.fromkeys(chars) if c not in tokens]
    tokens += [f"<0x{b:02X}>" for b in range(128, 256)]  # UTF-8 bytes of non-ASCII text: exact roundtrip for any str
    while len(tokens) % _PADDING_MULTIPLE:
        tokens.append(f"<unused{len(tokens)}>")
    return tokens


class DemoTokenizer(Tokenizer):
    """Small deterministic tokenizer for the CPU demo: whole words of the R1-Zero template and reasoning as single
    tokens, the four tags, every printable ASCII character, UTF-8 byte fallback; decode(encode(s)) == s always."""

    def __init__(self, vocab: list[str] | None = None):
        self.vocab = vocab or _demo_vocab()
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab)
        self.pad_id, self.eos_id, self.bos_id = (self.ids[s] for s in _SPECIALS)
        self._byte_base = self.ids["<0x80>"]

    def _text_id(self, piece: str) -> int | None:
        """The id of `piece` if text may produce it: specials and padding are never produced from text."""
        tid = self.ids.get(piece)
        if tid is None or tid < len(_SPECIALS) or self.vocab[tid].startswith(("<unused", "<0x")):
            return None
        return tid

    def _encode_piece(self, piece: str, out: list[int]) -> None:
        tid = self._text_id(piece)
        if tid is not None:
            out.append(tid)
        elif len(piece) > 1 and piece[0] == " " and self._text_id(piece[1:]) is not None:
            out += [self.ids[" "], self._text_id(piece[1:])]
        else:
            for ch in piece:
                cid = self.ids.get(ch)
                if ord(ch) < 128:
                    out.append(cid)
                else:  # UTF-8 bytes of a non-ASCII character are all >= 0x80
                    out += [self._byte_base + b - 128 for b in ch.encode("utf-8")]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in _PIECE_RE.findall(text):
            self._encode_piece(piece, out)
        return out

    def decode(self, ids: list[int]) -> str:
        buf = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if i < len(_SPECIALS) or self.vocab[i].startswith("<unused"):
                continue  # special/padding ids carry no text
            if self._byte_base <= i < self._byte_base + 128:
                buf.append(i - self._byte_base + 128)
            else:
                buf += self.vocab[i].encode("utf-8")
        return buf.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / DEMO_FILE).write_text(json.dumps({"type": "demo", "vocab": self.vocab}, ensure_ascii=False))


_EOS_CANDIDATES = ["<\uff5cend\u2581of\u2581sentence\uff5c>", "<|endoftext|>", "<|im_end|>", "</s>", "<eos>",
                   "<|end_of_text|>"]
_BOS_CANDIDATES = ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<s>", "<bos>", "<|begin_of_text|>"]


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; special ids from tokenizer_config.json when present, else common names."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        self.directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"tokenizer: {file} not found")
        self.tok = _Tok.from_file(str(file))
        config = {}
        if (self.directory / "tokenizer_config.json").exists():
            config = json.loads((self.directory / "tokenizer_config.json").read_text())
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special(config.get("eos_token"), _EOS_CANDIDATES)
        if self.eos_id is None:
            raise ConfigError(f"tokenizer {file}: cannot find the end-of-sequence token; "
                              f"set eos_token in tokenizer_config.json")
        self.bos_id = self._special(config.get("bos_token"), _BOS_CANDIDATES)
        pad = self._special(config.get("pad_token"), ["<pad>", "<|pad|>", "[PAD]"])
        self.pad_id = self.eos_id if pad is None else pad
        self.config = config
        jinja = self.directory / "chat_template.jinja"
        template = jinja.read_text() if path.is_dir() and jinja.is_file() else config.get("chat_template")
        self.chat_template = template if isinstance(template, str) and template else None
        self._hf = None

    def _hf_tokenizer(self):
        """transformers' tokenizer of this directory (loaded once, offline): the chat template's renderer."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        return self._hf

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`messages` through the model's chat template, rendered by HF's own `apply_chat_template` (system
        prompt, special tokens, the opened assistant turn exactly as transformers builds them)."""
        if self.chat_template is None:
            return super().render_chat(messages, add_generation_prompt)
        return self._hf_tokenizer().apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)

    def _special(self, configured, candidates: list[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in ([configured] if configured else []) + candidates:
            tid = self.tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        config = dict(self.config)
        for key, tid in (("eos_token", self.eos_id), ("bos_token", self.bos_id), ("pad_token", self.pad_id)):
            if tid is not None:
                config.setdefault(key, self.tok.id_to_token(tid))
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


# The files of an HF tokenizer directory that define it (and its chat template / generation defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", DEMO_FILE)


def copy_tokenizer_files(spec: str, dst: str | Path) -> list[str]:
    """Write the tokenizer `spec` names into directory `dst` as files `load_tokenizer(dst)` reads back; returns
    the names written. HF files are copied byte for byte (with their chat template); the demo tokenizer is saved."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if spec is None or spec.startswith("builtin:"):
        load_tokenizer(spec).save(dst)
        return [DEMO_FILE]
    path = Path(spec)
    if path.is_file():
        name = DEMO_FILE if path.name == DEMO_FILE else "tokenizer.json"
        shutil.copy2(path, dst / name)
        copied = [name]
        if name != DEMO_FILE:  # a tokenizer.json named by path: its directory's config files belong to it
            for n in TOKENIZER_FILES[1:-1]:
                if (path.parent / n).is_file():
                    shutil.copy2(path.parent / n, dst / n)
                    copied.append(n)
        return copied
    copied = []
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            if (path / name).resolve() != (dst / name).resolve():
                shutil.copy2(path / name, dst / name)
            copied.append(name)
    if not copied:
        raise ConfigError(f"tokenizer {spec!r}: no tokenizer files to copy")
    return copied


def has_tokenizer_files(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / "tokenizer.json").is_file() or (directory / DEMO_FILE).is_file()


def load_tokenizer(spec: str | None) -> Tokenizer:
    """`builtin:demo`, a directory (demo_tokenizer.json or HF tokenizer.json), or a path to a tokenizer.json.

    None (an unresolved `tokenizer.path`: no checkpoint carried one) is the demo tokenizer."""
    if spec is None or spec == "builtin:demo":
        return DemoTokenizer()
    if spec.startswith("builtin:"):
        raise ConfigError(f"unknown built-in tokenizer {spec!r}; known: builtin:demo")
    path = Path(spec)
    if path.is_dir() and (path / DEMO_FILE).exists():
        data = json.loads((path / DEMO_FILE).read_text())
        return DemoTokenizer(data["vocab"])
    if path.is_file() and path.name == DEMO_FILE:
        return DemoTokenizer(json.loads(path.read_text())["vocab"])
    if (path.is_dir() and (path / "tokenizer.json").exists()) or (path.is_file() and path.suffix == ".json"):
        return HFTokenizer(path)
    raise ConfigError(f"tokenizer {spec!r}: expected builtin:demo, a directory with tokenizer.json or "
                      f"{DEMO_FILE}, or a tokenizer.json file")


# ---------------------------------------------------------------------------------- a checkpoint's own tokenizer
# Every checkpoint (converted or saved by a stage) keeps its tokenizer, chat template and HF config files in this
# subdirectory of its iteration directory (converted checkpoints: of the checkpoint root). File-system only, so
# config loading can use it without importing torch.
CHECKPOINT_ASSETS = "hf"


def checkpoint_assets_dir(ckpt: str | Path) -> Path | None:
    """The `hf/` directory of a checkpoint (root with `latest`, or an iteration directory), or None."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return None
    dirs = [ckpt]
    latest = ckpt / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if name and "/" not in name and (ckpt / name).is_dir():
            dirs.insert(0, ckpt / name)
    elif (ckpt / "metadata.json").is_file():
        dirs.append(ckpt.parent)  # an iteration directory of a checkpoint whose root holds hf/
    for d in dirs:
        if (d / CHECKPOINT_ASSETS).is_dir():
            return d / CHECKPOINT_ASSETS
    return None


def checkpoint_tokenizer(ckpt: str | Path) -> Path | None:
    """The directory of the tokenizer a checkpoint carries (its `hf/`), or None when it carries none."""
    assets = checkpoint_assets_dir(ckpt)
    return assets if assets is not None and has_tokenizer_files(assets) else None


def is_checkpoint_tokenizer(spec: str | None) -> bool:
    """Whether `spec` names a tokenizer carried inside a checkpoint (such a path is recorded as `null`: the
    checkpoint's own, which every checkpoint saved from it carries too)."""
    if not spec or spec.startswith("builtin:"):
        return False
    path = Path(spec)
    parent = path.parent
    return path.name == CHECKPOINT_ASSETS and ((parent / "latest").is_file() or (parent / "metadata.json").is_file())


def _vocab_size(spec: str) -> int:
    return load_tokenizer(spec).vocab_size


def tokenizer_for_checkpoint(explicit: str | None, ckpt: str | Path | None, model_vocab: int,
                             source: str = "tokenizer.path", fallback: str | None = None) -> str:
    """The tokenizer spec for a model loaded from checkpoint `ckpt` (None: not from a checkpoint).

    `explicit` (what the user set) wins; unset, the checkpoint's own tokenizer, else `fallback`, else the demo
    tokenizer. A tokenizer that cannot be this checkpoint's is a ConfigError naming both: an explicit one whose
    vocabulary differs from the one the checkpoint carries, or the demo tokenizer for a larger model."""
    carried = checkpoint_tokenizer(ckpt) if ckpt else None
    if explicit is None:
        if carried is not None:
            return str(carried)
        if fallback is not None:
            return fallback
        demo = DemoTokenizer().vocab_size
        # Models made for the demo tokenizer pad its ids a little (the tiny presets: 512); a real model's
        # vocabulary (tens of thousands) means its tokenizer is missing.
        if ckpt is not None and model_vocab > 2 * demo:
            raise ConfigError(f"{source}: unset, and checkpoint {ckpt} carries no tokenizer; the built-in demo "
                              f"tokenizer ({demo} ids) cannot be the tokenizer of its {model_vocab}-id model: "
                              f"name the model's tokenizer")
        return "builtin:demo"
    if carried is not None and Path(explicit).resolve() != carried.resolve():
        ours, theirs = _vocab_size(explicit), _vocab_size(str(carried))
        if ours != theirs:
            raise ConfigError(f"{source}: {explicit} has {ours} tokens, but checkpoint {ckpt} was made with a "
                              f"{theirs}-token tokenizer ({carried}); leave it unset to use the checkpoint's own")
    return explicit


def resolve_tokenizer(cfg, source: str = "config") -> None:
    """Fill an unset `tokenizer.path` (None) from the checkpoint the run starts from (the resumed
    `checkpoint.save`, else `checkpoint.load`), see tokenizer_for_checkpoint; in place."""
    ck = cfg.checkpoint
    start = next((d for d in (ck.save, ck.load) if d and (Path(d) / "latest").is_file()), None)
    if start is None and ck.load and (Path(ck.load) / "metadata.json").is_file():
        start = ck.load
    cfg.tokenizer.path = tokenizer_for_checkpoint(cfg.tokenizer.path, start, cfg.model.vocab_size,
                                                  f"{source}: tokenizer.path")
