"""SentencePiece-style merging by token score (`tokenizer.ggml.model == "llama"`), as in llama.cpp.

llama.cpp's llm_tokenizer_spm: start from one symbol per character, and keep merging the adjacent
pair whose concatenation is a vocabulary token with the highest score (leftmost on ties), until
no adjacent pair forms a token. A final symbol that is not a token is written as byte tokens
`<0xXX>`. The caller has already put `▁` for every space (and the space prefix, if any).

There is no pre-splitting into words here: merges may cross spaces, so the whole run is one
merge problem. It can still be cut where no merge can ever cross: before a `▁` whose preceding
character is never followed by `▁` inside any token (no merged symbol could hold that pair).
`SPMModel` cuts there, solves the pieces independently (the merge order inside a piece is the
same as in the whole) and caches the answer per piece, which makes long texts cheap.
"""
from __future__ import annotations

import heapq
import re


class SPMModel:
    """Tokenizes runs of plain text (spaces already written as ▁) into ids."""

    def __init__(
        self,
        token_to_id: dict[str, int],
        scores: list[float],
        byte_fallback: list[int | None],
    ) -> None:
        self.token_to_id = token_to_id
        self.scores = scores
        # byte value -> token id of "<0xXX>" (or of the one-character token, llama.cpp's
        # second choice); the caller decides what stands in where there is neither.
        self.byte_fallback = byte_fallback
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_limit = 1 << 16

    # Candidate cuts: before each ▁ that follows another character (a word and its leading ▁
    # form one piece). Such a cut is safe when no token contains that character followed by ▁.
    _PIECE = re.compile(r"▁*[^▁]+|▁+")

    def encode(self, text: str) -> list[int]:
        if len(text) <= 256:
            return list(self._cached_run(text))
        out: list[int] = []
        for run in self._independent_runs(text):
            # long runs rarely repeat: keep the cache for words
            out.extend(self._cached_run(run) if len(run) <= 256 else self._encode_run(run))
        return out

    def _cached_run(self, run: str) -> tuple[int, ...]:
        ids = self._cache.get(run)
        if ids is None:
            ids = self._encode_run(run)
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()
            self._cache[run] = ids
        return ids

    def _independent_runs(self, text: str):
        """Cut `text` before a ▁ only where no token holds the preceding character followed by
        ▁: no merge can then join the two sides, so each side merges as it does in the whole."""
        glue = self._chars_before_space()
        start = 0
        for m in self._PIECE.finditer(text):
            s = m.start()
            # every piece but the first starts with ▁ and follows a non-▁ character
            if s > start and text[s - 1] not in glue:
                yield text[start:s]
                start = s
        if start < len(text):
            yield text[start:]

    def _chars_before_space(self) -> set[str]:
        glue = getattr(self, "_glue", None)
        if glue is None:
            # Characters c such that some token contains "c▁". Built on the first long input,
            # not at load time (a pass over the vocabulary).
            glue = set()
            for tok in self.token_to_id:
                i = tok.find("▁", 1)
                while i > 0:
                    glue.add(tok[i - 1])
                    i = tok.find("▁", i + 1)
            self._glue = glue
        return glue

    def _encode_run(self, text: str) -> tuple[int, ...]:
        n = len(text)
        if n == 0:
            return ()
        vocab = self.token_to_id
        scores = self.scores
        get = vocab.get
        # Symbol i starts at character i (a merge keeps its left symbol's start); length[i] is
        # its length in characters, 0 once it has been merged into its left neighbour.
        length = [1] * n
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            tid = get(text[i:i + 2])
            if tid is not None:
                # max-heap on score, then the leftmost pair: llm_bigram_spm::comparator
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        heappush, heappop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, size = heappop(heap)
            ll, rl = length[left], length[right]
            # Outdated entry: a side was merged away, or grew, since it was queued.
            if ll == 0 or rl == 0 or ll + rl != size:
                continue
            length[left] = size
            length[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
                tid = get(text[left:after + length[after]])
                if tid is not None:
                    heappush(heap, (-scores[tid], left, after, size + length[after]))
            before = prv[left]
            if before >= 0:
                tid = get(text[before:left + size])
                if tid is not None:
                    heappush(heap, (-scores[tid], before, left, left + size - before))
        out: list[int] = []
        i = 0
        fallback = self.byte_fallback
        while i != -1:
            piece = text[i:i + length[i]]
            tid = get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode("utf-8", "surrogatepass"):
                    fb = fallback[b]
                    if fb is not None:
                        out.append(fb)
            i = nxt[i]
        return tuple(out)
