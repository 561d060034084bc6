"""Tokenizers behind one interface: the built-in demo tokenizer and HF `tokenizer.json` files."""
from __future__ import annotations

import abc
import json
import re
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


def load_tokenizer(spec: str) -> Tokenizer:
    """`builtin:demo`, a directory (demo_tokenizer.json or HF tokenizer.json), or a path to a tokenizer.json."""
    if spec == "builtin:demo":
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
