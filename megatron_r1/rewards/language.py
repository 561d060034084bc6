"""`language_consistency` reward: the share of reasoning words written in the target language (R1's LC reward)."""
from __future__ import annotations

import functools
import re
import unicodedata

from megatron_r1.errors import ConfigError
from megatron_r1.rewards.extract import extract_think
from megatron_r1.rewards.registry import register_reward

# Languages identified by script alone; a Han character counts for zh and ja (kanji), kana only for ja.
_SCRIPT_LANGS = {
    "zh": {"han"}, "ja": {"han", "kana"}, "ko": {"hangul"}, "ru": {"cyrillic"}, "uk": {"cyrillic"},
    "bg": {"cyrillic"}, "el": {"greek"}, "ar": {"arabic"}, "fa": {"arabic"}, "he": {"hebrew"}, "th": {"thai"},
    "hi": {"devanagari"},
}
# Latin-script languages told apart by lingua; restricting the set keeps it fast and reduces confusions.
_LATIN_LANGS = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "pl", "tr", "id", "vi")

_SHORT_RUN = 2
_MIXED_MIN_WORDS = 8  # below this, a run is judged as one language

# A "word": one CJK character (those scripts do not separate words with spaces) or a run of letters.
_WORD_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W\d_]+")


def _script(word: str) -> str:
    ch = word[0]
    cp = ord(ch)
    if 0x3040 <= cp <= 0x30FF:
        return "kana"
    if 0x3400 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF:
        return "han"
    if 0xAC00 <= cp <= 0xD7AF:
        return "hangul"
    name = unicodedata.name(ch, "")
    for script in ("LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "THAI", "DEVANAGARI"):
        if name.startswith(script):
            return script.lower()
    return "other"


@functools.lru_cache(maxsize=None)
def _latin_detector(languages: tuple[str, ...]):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in languages]
    return LanguageDetectorBuilder.from_languages(*langs).build()


def _latin_share(runs: list[list[str]], target: str) -> float:
    """How many words of the Latin-script `runs` lingua attributes to `target` (fractional per run)."""
    detector = _latin_detector(tuple(sorted(set(_LATIN_LANGS) | {target})))
    hits = 0.0
    for run in runs:
        text = " ".join(run)
        if len(run) <= _SHORT_RUN:
            # One or two words between formulas ("then", "so") are ambiguous across languages: count them unless
            # the target is clearly less likely than the best guess.
            conf = {c.language.iso_code_639_1.name.lower(): c.value
                    for c in detector.compute_language_confidence_values(text)}
            hits += len(run) * (conf.get(target, 0.0) >= 0.5 * max(conf.values(), default=0.0) > 0.0)
            continue
        sections = detector.detect_multiple_languages_of(text) if len(run) >= _MIXED_MIN_WORDS else []
        if len(sections) > 1:  # genuinely mixed: credit the words of the target's sections
            total = sum(sec.word_count for sec in sections)
            good = sum(sec.word_count for sec in sections if sec.language.iso_code_639_1.name.lower() == target)
            hits += len(run) * good / total
        else:
            # Whole-text detection is more reliable than the section splitter on short or uniform runs.
            lang = detector.detect_language_of(text)
            hits += len(run) * (lang is not None and lang.iso_code_639_1.name.lower() == target)
    return hits


def language_share(text: str, target: str) -> float:
    """Fraction of words in `text` that are in language `target` (ISO 639-1); 0.0 when there are no words."""
    words = _WORD_RE.findall(text)
    if not words:
        return 0.0
    target = target.lower()
    scripts = [_script(w) for w in words]
    if target in _SCRIPT_LANGS:
        return sum(s in _SCRIPT_LANGS[target] for s in scripts) / len(words)
    check_language(target)
    # Consecutive Latin words form one run for lingua (it needs context); any other script breaks the run.
    runs: list[list[str]] = []
    prev_latin = False
    for w, s in zip(words, scripts):
        if s == "latin":
            if not prev_latin:
                runs.append([])
            runs[-1].append(w)
        prev_latin = s == "latin"
    return _latin_share(runs, target) / len(words) if runs else 0.0


def check_language(code: str) -> str:
    """`code` lower-cased if the reward supports it, else a ConfigError listing the supported codes."""
    code = code.lower()
    if code not in _SCRIPT_LANGS and code not in _LATIN_LANGS:
        raise ConfigError(f"language_consistency: unsupported language {code!r}; "
                          f"supported: {', '.join(sorted(set(_SCRIPT_LANGS) | set(_LATIN_LANGS)))}")
    return code


@register_reward("language_consistency")
class LanguageConsistencyReward:
    """Share of words inside `<think>` in the target language: the `language` option, else `sample["language"]`."""

    def __init__(self, language: str | None = None, language_field: str = "language"):
        self.language = check_language(language) if language else None  # a config typo fails at startup
        self.language_field = language_field

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        scores = []
        for completion, sample in zip(completions, samples, strict=True):
            target = self.language or sample.get(self.language_field)
            if not target:
                raise ValueError(f"language_consistency: sample has no {self.language_field!r} and no language option")
            scores.append(language_share(extract_think(completion), target))
        return scores
