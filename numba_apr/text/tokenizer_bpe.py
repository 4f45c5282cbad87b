"""Byte-level BPE (`tokenizer.ggml.model == "gpt2"`): pre-tokenizers, the GPT-2 byte map, merges.

What llama.cpp does for one run of plain text (src/llama-vocab.cpp, src/unicode.cpp):

1. split it into words with the pre-tokenizer of `tokenizer.ggml.pre`: a chain of regexes, each
   splitting every piece the previous one left (`PRE_TOKENIZERS` below);
2. write each word's UTF-8 bytes as GPT-2's printable stand-in characters (`BYTE_TO_UNICODE`);
3. merge adjacent symbols by merge rank, lowest rank first and leftmost first on ties;
4. look every final symbol up in the vocabulary.

llama.cpp does not run the regexes of the common pre-tokenizers through a regex engine: it
hand-codes them (`unicode_regex_split_custom_gpt2/llama3/qwen2`) over its own Unicode tables,
and runs the rest through std::regex on text whose non-ASCII code points are collapsed to one
byte per category. The patterns here are written so that Python's `re` engine, given
llama.cpp's character classes (`tokenizer_unicode`), splits exactly as that code does; the
comments on each say where the hand-coded version differs from the textbook regex. (`re`, not
the `regex` package: with the classes spelled out no \\p{..} is needed, and `re` matches these
large classes about five times faster.)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import re

from . import tokenizer_unicode as U

# ---------------------------------------------------------------------------------------------
# Character classes (bodies for use inside [...]), as llama.cpp's unicode_cpt_flags sees them.
# ---------------------------------------------------------------------------------------------
_L = U.LETTER
_N = U.NUMBER
_W = U.WHITESPACE
_P = U.PUNCT

# GPT-2's own pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
# llama.cpp's hand-coded version appends a plain `\s+` (a lone whitespace before a non-space),
# and its contractions are case-sensitive.
_GPT2 = (
    r"'(?:s|t|re|ve|m|ll|d)"
    rf"| ?[{_L}]+"
    rf"| ?[{_N}]+"
    rf"| ?[^{_W}{_L}{_N}]+"
    rf"|[{_W}]+(?![^{_W}])"
    rf"|[{_W}]+"
)

# llama3 / qwen2: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
#   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
# The case-insensitive contractions only ever fold ASCII letters there (unicode_tolower maps no
# other code point onto s, t, r, e, v, m, l or d), hence the explicit [sS] forms.
_CONTRACTIONS_CI = r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])"


def _llama3_like(numbers: str) -> str:
    return (
        _CONTRACTIONS_CI
        + rf"|[^\r\n{_L}{_N}]?[{_L}]+"
        + rf"|[{_N}]{numbers}"
        + rf"| ?[^{_W}{_L}{_N}]+[\r\n]*"
        + rf"|[{_W}]*[\r\n]+"
        + rf"|[{_W}]+(?![^{_W}])"
        + rf"|[{_W}]+"
    )


_LLAMA3 = _llama3_like("{1,3}")
_QWEN2 = _llama3_like("")

# Patterns llama.cpp runs through std::regex (the `isolate` stages): a match becomes a piece
# of its own, and so does each stretch of text between matches. Its category collapsing maps
# \p{N} to llama.cpp's NUMBER flag and \p{P} to PUNCTUATION, which these classes reproduce.
_ISO_DIGIT = rf"[{_N}]"                       # "\\p{N}"
_ISO_DIGITS = rf"[{_N}]+"                     # "\\p{N}+"
_ISO_PUNCT = rf"[{_P}\$\+<=>\^~\|]+"         # "[\\p{P}\\$\\+<=>\\^~\\|]+"
_ISO_ASCII3 = r"[0-9][0-9][0-9]"              # "[0-9][0-9][0-9]"


@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` value: its regex chain and the llama.cpp flags that go with it."""

    stages: tuple[tuple[str, str], ...]  # ("split" | "isolate", pattern), applied in order
    ignore_merges: bool = False  # a word that is itself a token is emitted whole (llama3)
    clean_spaces: bool = True  # detokenize drops the space in " ," " 's" ... (BPE default)
    add_bos: bool = False  # BOS default when `tokenizer.ggml.add_bos_token` is absent


_GPT2_PRE = PreTokenizer((("split", _GPT2),))
_SMOLLM_PRE = PreTokenizer((("isolate", _ISO_DIGIT), ("split", _GPT2)), clean_spaces=False)
_LLAMA3_PRE = PreTokenizer((("split", _LLAMA3),), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizer((("split", _QWEN2),), clean_spaces=False)
_DEFAULT_PRE = PreTokenizer(
    (
        ("isolate", _ISO_PUNCT),
        ("split", _GPT2),
        ("isolate", _ISO_DIGITS),
        ("isolate", _ISO_ASCII3),
    )
)

# `tokenizer.ggml.pre` -> pre-tokenizer. Only names whose regexes *and* flags are exactly one of
# the above in llama.cpp are listed; anything else is refused rather than tokenized subtly wrong.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT_PRE,
    "gpt-2": _GPT2_PRE,
    "phi-2": _GPT2_PRE,
    "qwen2": _QWEN2_PRE,
    "deepseek-r1-qwen": _QWEN2_PRE,
    "smollm": _SMOLLM_PRE,
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
    "llama-bpe": _LLAMA3_PRE,
}

_compiled: dict[str, re.Pattern] = {}


def _compile(pattern: str) -> re.Pattern:
    pat = _compiled.get(pattern)
    if pat is None:
        pat = _compiled[pattern] = re.compile(pattern)
    return pat


def split_words(text: str, pre: PreTokenizer) -> list[str]:
    """The pre-tokenizer's words, in order; their concatenation is `text`."""
    pieces = [text] if text else []
    for kind, pattern in pre.stages:
        pat = _compile(pattern)
        if kind == "split":
            # The hand-coded splitters consume every code point, and each of these patterns can
            # match at any position, so findall returns a partition of the piece.
            out: list[str] = []
            for piece in pieces:
                out.extend(pat.findall(piece))
        else:
            out = []
            for piece in pieces:
                last = 0
                for m in pat.finditer(piece):
                    s, e = m.span()
                    if s > last:
                        out.append(piece[last:s])
                    out.append(piece[s:e])
                    last = e
                if last < len(piece):
                    out.append(piece[last:])
        pieces = out
    return pieces


# ---------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode map: printable bytes stand for themselves, the other 68 are moved to
# U+0100.. in byte order, so every byte sequence has a printable, whitespace-free spelling.
# ---------------------------------------------------------------------------------------------
def _byte_to_unicode() -> list[str]:
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: list[str] = _byte_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
# str.translate table applied to a latin-1 view of the UTF-8 bytes: one C call per word.
_ENCODE_TABLE = {b: c for b, c in enumerate(BYTE_TO_UNICODE)}


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes spelled with GPT-2's stand-in characters."""
    # surrogatepass: a lone surrogate reaches llama.cpp as its 3-byte (CESU) form, so keep it.
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_ENCODE_TABLE)


def byte_decode(text: str) -> bytes | None:
    """Inverse of `byte_encode`, or None if `text` has a character outside the map."""
    try:
        return bytes([UNICODE_TO_BYTE[c] for c in text])
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------
def parse_merges(merges: list[str]) -> dict[str, int]:
    """`tokenizer.ggml.merges` ("left right" strings) -> {"left right": rank}.

    llama.cpp keys its ranks by the pair (left, right), splitting each line at its first space
    from the second character on; a pair is looked up here as `left + " " + right`. The two
    agree because a byte-level BPE symbol never contains a space (byte 0x20 is spelled "Ġ"):
    the joined key has exactly one space at position >= 1, so it can only equal a line that
    llama.cpp splits into the same pair. The first of duplicate lines keeps its rank
    (std::unordered_map::emplace does not overwrite), hence the reversed build.
    """
    n = len(merges)
    return dict(zip(reversed(merges), range(n - 1, -1, -1)))


class BPEModel:
    """Tokenizes runs of plain text (no special tokens in them) into ids."""

    def __init__(
        self,
        token_to_id: dict[str, int],
        merges: list[str],
        pre: PreTokenizer,
    ) -> None:
        self.token_to_id = token_to_id
        self.ranks = parse_merges(merges)
        self.pre = pre
        # Word -> ids. Text repeats its words, so this makes BPE cost about one dict lookup per
        # word. Bounded so a long-lived process fed random text cannot grow it without end.
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_limit = 1 << 18

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for word in split_words(text, self.pre):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(byte_encode(word))
                if len(cache) >= self._cache_limit:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)
        return out

    def _encode_word(self, word: str) -> tuple[int, ...]:
        vocab = self.token_to_id
        if self.pre.ignore_merges:
            tid = vocab.get(word)
            if tid is not None:
                return (tid,)
        syms = self._merge(word)
        out: list[int] = []
        for s in syms:
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
                continue
            # No token for the symbol: llama.cpp then looks up each of its UTF-8 bytes as a
            # one-byte string and drops the ones that are not tokens. (Token texts were decoded
            # with surrogateescape, so a raw byte >= 0x80 is spelled U+DC80..U+DCFF here too.)
            for b in s.encode("utf-8"):
                tid = vocab.get(chr(b) if b < 0x80 else chr(0xDC00 + b))
                if tid is not None:
                    out.append(tid)
        return tuple(out)

    def _merge(self, word: str) -> list[str]:
        """Symbols of `word` after merging: the lowest-rank adjacent pair first, leftmost first
        among equal ranks, until no adjacent pair has a rank (llama.cpp's llm_tokenizer_bpe)."""
        n = len(word)
        if n <= 1:
            return [word] if n else []
        ranks = self.ranks
        sym = list(word)  # text of each symbol; "" once merged into its left neighbour
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = ranks.get(sym[i] + " " + sym[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, sym[i] + sym[i + 1]))
        heapq.heapify(heap)
        heappush, heappop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, text = heappop(heap)
            a, b = sym[left], sym[right]
            # Outdated entry: one side was merged away or has grown since it was queued.
            if not a or not b or a + b != text:
                continue
            sym[left] = text
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                r = ranks.get(sym[before] + " " + text)
                if r is not None:
                    heappush(heap, (r, before, left, sym[before] + text))
            if after >= 0:
                r = ranks.get(text + " " + sym[after])
                if r is not None:
                    heappush(heap, (r, left, after, text + sym[after]))
        return [s for s in sym if s]
