"""The tokenizer: text <-> token ids exactly as llama.cpp's llama-vocab.cpp does it.

`Tokenizer.from_gguf` builds one from a GGUF file's `tokenizer.*` metadata. Two models:

- `gpt2`: byte-level BPE with a regex pre-tokenizer chosen by `tokenizer.ggml.pre`
  (tokenizer_bpe.py);
- `llama`: SentencePiece-style merging by token score with `<0xXX>` byte fallback
  (tokenizer_spm.py), as used by llama/mistral SPM vocabularies and gemma3.

This module holds what is common to both, following llama.cpp step for step:

- token attributes from `tokenizer.ggml.token_type`, plus llama.cpp's by-name fix-ups (a token
  whose text is `<|im_end|>`, `</s>`, ... is treated as a control token even if the file says
  normal);
- special tokens: control / user-defined / unknown tokens cut out of the text before the model
  sees it (`tokenizer_st_partition`), longest token text first;
- BOS/EOS as the metadata (or llama.cpp's per-model default) says;
- the end-of-generation set (`special_eog_ids`);
- pieces, detokenization (with llama.cpp's `clean_spaces` and leading-space rules) and a
  streaming decoder that only ever returns whole UTF-8 characters.

Token texts are kept as `str` decoded with `surrogateescape`, so a token holding bytes that are
not UTF-8 still round-trips to its exact bytes.
"""
from __future__ import annotations

import codecs
import re
from typing import Iterable

import numpy as np

from ..errors import NumbaAprError, UnsupportedError
from .tokenizer_bpe import PRE_TOKENIZERS, UNICODE_TO_BYTE, BPEModel
from .tokenizer_spm import SPMModel

# llama.h: llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type value (llama_token_type) -> attribute; anything else is UNDEFINED.
_TYPE_TO_ATTR = np.array(
    [ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED,
     ATTR_BYTE],
    dtype=np.int32,
)

_KEY = "tokenizer.ggml."

# Texts llama.cpp takes for the end-of-turn token when `eot_token_id` is not in the file.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Every token with one of these texts ends generation (llama.cpp's special_eog_ids).
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)

# Special-id metadata keys, in llama.cpp's order (the deprecated FIM names come last and win).
_ID_KEYS = (
    ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
    ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
    ("pad", "padding_token_id"), ("mask", "mask_token_id"),
    ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
    ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"),
    ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id"),
    ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"),
    ("fim_mid", "middle_token_id"),
)

_C_ISSPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale: what LSTRIP/RSTRIP strip


# ---------------------------------------------------------------------------------------------
# GGUF metadata access (over numba_apr.model.gguf_file.GGUFFile's parsed `metadata`)
# ---------------------------------------------------------------------------------------------
def _bpe_pre(name):
    """The pre-tokenizer of a `tokenizer.ggml.pre` value (missing: llama.cpp's "default")."""
    name = "default" if name is None else name
    if name not in PRE_TOKENIZERS:
        raise UnsupportedError(f"unsupported pre-tokenizer '{name}' ({_KEY}pre); supported: "
                               f"{', '.join(PRE_TOKENIZERS)}")
    return PRE_TOKENIZERS[name]


def _get(meta: dict, key: str, required: bool = False):
    v = meta.get(key)
    if v is None and required:
        raise NumbaAprError(f"GGUF file has no tokenizer key '{key}'")
    return v


# ---------------------------------------------------------------------------------------------
# Streaming decoder
# ---------------------------------------------------------------------------------------------
class StreamDecoder:
    """Turns ids into text one at a time without ever splitting a UTF-8 character.

    `add(id)` returns the text that is complete so far (possibly ""); bytes of a character that
    spans several tokens (byte-fallback tokens, or a BPE token ending mid-character) are held
    until the rest arrives. `flush()` returns what is left, with U+FFFD for a truncated
    character. Pieces are concatenated as llama.cpp's streaming output does (token_to_piece per
    token): the whole-text clean-ups of `detokenize` (`clean_spaces`, the SPM leading space)
    are not applied.
    """

    def __init__(self, tokenizer: "Tokenizer", special: bool = True) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id, special=self._special))

    def flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """llama.cpp-exact tokenizer for `gpt2` (byte-level BPE) and `llama` (SPM) vocabularies."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    eog_ids: frozenset[int]
    chat_template: str | None

    @classmethod
    def from_gguf(cls, gguf_file) -> "Tokenizer":
        """From a parsed `numba_apr.model.gguf_file.GGUFFile`, every tokenizer key checked first for its
        type, the arrays for their lengths and the special token ids for the vocabulary's range."""
        g = gguf_file
        n = len(g.get_array(_KEY + "tokens", "str", ()))
        for key in (_KEY + "model", _KEY + "pre", "tokenizer.chat_template", "general.name"):
            g.get_str(key)
        for key, kind in (("token_type", "i32"), ("scores", "float"), ("merges", "str")):
            arr = g.get_array(_KEY + key, kind)
            if arr is not None and key != "merges" and len(arr) != n:
                raise NumbaAprError(f"{g.path}: {_KEY}{key} has {len(arr)} entries for {n} tokens")
        for _, key in _ID_KEYS:
            g.get_int(_KEY + key, lo=0, hi=n - 1)
        for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
            g.get_bool(_KEY + key)
        try:
            return cls.from_metadata(g.metadata)
        except NumbaAprError as e:  # (the checks inside name the key, not the file)
            raise type(e)(f"{g.path}: {e}") from None

    @classmethod
    def from_metadata(cls, md: dict) -> "Tokenizer":
        model = _get(md, _KEY + "model")
        if model is None:
            raise NumbaAprError(f"GGUF file has no tokenizer key '{_KEY}model'")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(
                f"unsupported tokenizer model '{model}' ({_KEY}model); supported: gpt2, llama"
            )
        pre_name = _get(md, _KEY + "pre")
        tokens = list(_get(md, _KEY + "tokens", required=True))
        token_type = _get(md, _KEY + "token_type")
        token_type = None if token_type is None else np.asarray(token_type)
        if model == "gpt2":
            _bpe_pre(pre_name)  # refuse an unknown pre-tokenizer before reading the merges
            merges = _get(md, _KEY + "merges", required=True)
            scores = None
        else:
            merges = None
            sc = _get(md, _KEY + "scores")
            sc = None if sc is None else np.asarray(sc)
            scores = sc.astype(np.float64).tolist() if sc is not None else None

        meta = {}
        for _, key in _ID_KEYS:
            v = _get(md, _KEY + key)
            if v is not None:
                meta[key] = int(v)
        for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
            v = _get(md, _KEY + key)
            if v is not None:
                meta[key] = bool(v)
        return cls(
            model=model,
            pre_name=pre_name,
            tokens=tokens,
            token_type=token_type,
            scores=scores,
            merges=merges,
            meta=meta,
            chat_template=_get(md, "tokenizer.chat_template"),
            model_name=_get(md, "general.name") or "",
        )

    def __init__(
        self,
        *,
        model: str,
        tokens: list[str],
        token_type: np.ndarray | None = None,
        scores: list[float] | None = None,
        merges: list[str] | None = None,
        pre_name: str | None = None,
        meta: dict | None = None,
        chat_template: str | None = None,
        model_name: str = "",
    ) -> None:
        """Build from decoded metadata (`from_gguf` is the usual way in).

        meta: the `tokenizer.ggml.*` scalars present in the file, by key without the prefix
        (`bos_token_id`, `add_bos_token`, `add_space_prefix`, ...).
        """
        meta = meta or {}
        self.model = model
        self.pre_name = pre_name
        self.chat_template = chat_template
        n = self.n_vocab = len(tokens)
        _pre = _bpe_pre(pre_name) if model == "gpt2" else None
        for what, arr in (("token_type", token_type), ("scores", scores)):
            if arr is not None and len(arr) < n:
                raise NumbaAprError(f"{_KEY}{what} has {len(arr)} entries for {n} tokens")
        # llama.cpp gives an empty token a placeholder text so that it stays addressable.
        if "" in tokens:
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens = tokens
        self.token_to_id: dict[str, int] = dict(zip(tokens, range(n)))  # last duplicate wins

        if token_type is not None:
            tt = np.asarray(token_type, dtype=np.int64)
            ok = (tt >= 0) & (tt < len(_TYPE_TO_ATTR))
            attr = np.where(ok, _TYPE_TO_ATTR[np.where(ok, tt, 0)], ATTR_UNDEFINED)
            attr = attr.astype(np.int32)
        else:
            attr = np.full(n, ATTR_NORMAL, dtype=np.int32)

        # -- model and its defaults (llama_vocab::impl::load) --
        ids: dict[str, int | None] = dict.fromkeys(
            ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask",
             "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"))
        if model == "llama":
            ids.update(bos=1, eos=2, unk=0)
            self.add_bos, self.add_eos, self.add_space_prefix = True, False, True
            self.clean_spaces = False
        elif model == "gpt2":
            ids.update(bos=11, eos=11)
            self.add_bos, self.add_eos, self.add_space_prefix = _pre.add_bos, False, False
            self.clean_spaces = _pre.clean_spaces
        else:
            raise UnsupportedError(f"unsupported tokenizer model '{model}' ({_KEY}model)")
        self.add_space_prefix = meta.get("add_space_prefix", self.add_space_prefix)
        for name in ids:  # a default outside the vocabulary is disabled
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
        for name, key in _ID_KEYS:
            v = meta.get(key)
            if v is not None and 0 <= v < n:  # llama.cpp ignores an out-of-range id
                ids[name] = v
        self.add_bos = meta.get("add_bos_token", self.add_bos)
        self.add_eos = meta.get("add_eos_token", self.add_eos)

        # -- tokens recognised by their text --
        get = self.token_to_id.get

        def mark_control(tid: int) -> None:
            attr[tid] |= ATTR_CONTROL

        def first_present(texts) -> int | None:
            # llama.cpp walks an unordered_map and keeps the first hit; when a vocabulary has
            # several of these texts (rare) we take the lowest id.
            found = [get(t) for t in texts if get(t) is not None]
            return min(found) if found else None

        if ids["eot"] is None:
            ids["eot"] = first_present(_EOT_TEXTS)
            if ids["eot"] is not None:
                mark_control(ids["eot"])
        if ids["eom"] is None:
            ids["eom"] = first_present(_EOM_TEXTS)
            if ids["eom"] is not None:
                mark_control(ids["eom"])
        for name, texts in _FIM_TEXTS.items():
            if ids[name] is None:
                ids[name] = first_present(texts)
                if ids[name] is not None:
                    mark_control(ids[name])

        eog: set[int] = set()
        for name in ("fim_pad", "fim_rep", "fim_sep"):
            if ids[name] is not None:
                eog.add(ids[name])
        for text in _EOG_TEXTS:
            tid = get(text)
            if tid is not None:
                eog.add(tid)
                mark_control(tid)
        # gpt-oss: these structural tokens are always rendered
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = get(text)
            if tid is not None:
                attr[tid] = ATTR_USER_DEFINED
        for name in ("eos", "eot", "eom"):
            if ids[name] is not None:
                eog.add(ids[name])
        texts_in_eog = {tokens[t]: t for t in eog}
        # o200k_harmony / solar-open: there "<|end|>" ends a message, not the generation
        if "<|end|>" in texts_in_eog and (
            ("<|return|>" in texts_in_eog and ("<|call|>" in texts_in_eog
                                               or "<|calls|>" in texts_in_eog))
            or (("<|call|>" in texts_in_eog or "<|calls|>" in texts_in_eog)
                and "<|flush|>" in texts_in_eog)
        ):
            end_id = texts_in_eog["<|end|>"]
            eog.discard(end_id)
            attr[end_id] = ATTR_USER_DEFINED
        # gemma4 / plamo: "</s>" is an ordinary token there
        if "</s>" in texts_in_eog and (
            "<|tool_response>" in texts_in_eog or "<|plamo:eos|>" in texts_in_eog
        ):
            s_id = texts_in_eog["</s>"]
            eog.discard(s_id)
            attr[s_id] = ATTR_NORMAL

        self.eog_ids = frozenset(eog)
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.eot_id = ids["eot"]
        self.unk_id = ids["unk"]
        self.pad_id = ids["pad"]
        self.special_ids = ids

        # -- special tokens, longest text first (llama.cpp's cache_special_tokens) --
        special = np.nonzero(attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
        blen = [len(tokens[i].encode("utf-8", "surrogateescape")) for i in special]
        order = sorted(range(len(special)), key=lambda k: -blen[k])  # stable: ties by id
        self._special_order = [special[k] for k in order]
        self._special_rank = {tid: r for r, tid in enumerate(self._special_order)}
        self._special_trie = None  # built on first use

        # phi-3: its special tokens swallow the whitespace after them
        name = model_name.lower()
        if "phi-3" in name or "phi3" in name:
            for tid in self._special_order:
                attr[tid] |= ATTR_RSTRIP
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False),
                             ("<|endoftext|>", False)):
                tid = get(text)
                if tid is not None:
                    attr[tid] = (attr[tid] | ATTR_RSTRIP) if on else (attr[tid] & ~ATTR_RSTRIP)

        self._attr_list = attr.tolist()
        self._pieces: list[bytes | None] = [None] * n

        # -- the model proper --
        if model == "gpt2":
            self._bpe = BPEModel(self.token_to_id, merges or [], _pre)
            self._spm = None
            self.pre = _pre
        else:
            fallback: list[int | None] = []
            for b in range(256):
                tid = get(f"<0x{b:02X}>")
                if tid is None:  # llama.cpp's second choice: the byte as a one-character token
                    tid = get(chr(b) if b < 0x80 else chr(0xDC00 + b))
                if tid is None:  # llama.cpp would throw here; <unk> loses less
                    tid = self.unk_id
                fallback.append(tid)
            self._spm = SPMModel(self.token_to_id, scores or [0.0] * n, fallback)
            self._bpe = None
            self.pre = None

    # -----------------------------------------------------------------------------------------
    # attributes
    # -----------------------------------------------------------------------------------------
    def _check(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} out of range [0, {self.n_vocab})")
        return token_id

    def is_special(self, token_id: int) -> bool:
        """A control token (BOS, EOS, <|im_start|>, ...): not text."""
        return bool(self._attr_list[self._check(token_id)] & ATTR_CONTROL)

    def is_eog(self, token_id: int) -> bool:
        return int(token_id) in self.eog_ids

    def token_attr(self, token_id: int) -> int:
        """llama_token_attr bits of a token (after llama.cpp's by-name fix-ups)."""
        return self._attr_list[self._check(token_id)]

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry itself (e.g. "Ġthe", "▁the", "<0x0A>")."""
        return self.tokens[self._check(token_id)]

    # -----------------------------------------------------------------------------------------
    # tokenize
    # -----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """`text` -> ids, as llama_tokenize(text, add_special=add_bos, parse_special=special).

        add_bos: add BOS (and EOS) where the model's metadata says to (`add_bos`, `add_eos`).
        special: cut control tokens (`<|im_start|>`, `<bos>`...) out of the text as single
        ids; when False they are tokenized as plain text. User-defined tokens are cut out
        either way, as llama.cpp does.
        """
        frags = self._partition(text, special) if text else []
        out: list[int] = []
        add_special = add_bos
        if self._spm is not None:
            if add_special and self.add_bos:
                out.append(self._require(self.bos_id, "BOS"))
            prev_special = True  # the first fragment gets the space prefix too
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    f = " " + f
                out.extend(self._spm.encode(f.replace(" ", "▁")))
                prev_special = False
            if add_special and self.add_eos:
                out.append(self._require(self.eos_id, "EOS"))
        else:
            if add_special and self.add_bos:
                out.append(self._require(self.bos_id, "BOS"))
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out.extend(self._bpe.encode(f))
            if add_special and self.add_eos:
                out.append(self._require(self.eos_id, "EOS"))
        return out

    @staticmethod
    def _require(tid: int | None, what: str) -> int:
        if tid is None:
            raise NumbaAprError(f"the model adds a {what} token but its vocabulary has none")
        return tid

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of `text` (llama.cpp's tokenizer_st_partition).

        llama.cpp takes the special tokens one by one, longest text first, and splits every
        remaining text fragment at each of its occurrences, left to right. Most of the
        thousands of special tokens do not occur at all, so the ones that do are found first
        with a trie, and only those are run through that procedure, in the same order.
        """
        present = self._special_tokens_in(text)
        if not present:
            return [text]
        attr = self._attr_list
        if not parse_special:
            # control and unknown tokens stay text; user-defined ones are still cut out
            present = [t for t in present if not attr[t] & (ATTR_CONTROL | ATTR_UNKNOWN)]
            if not present:
                return [text]
        rank = self._special_rank
        present.sort(key=rank.__getitem__)
        frags: list[str | int] = [text]
        for tid in present:
            tok = self.tokens[tid]
            lstrip = attr[tid] & ATTR_LSTRIP
            rstrip = attr[tid] & ATTR_RSTRIP
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                parts = f.split(tok)
                last = len(parts) - 1
                for k, piece in enumerate(parts):
                    if k > 0:
                        new.append(tid)
                        if rstrip:
                            piece = piece.lstrip(_C_ISSPACE)
                    if k < last and lstrip:
                        piece = piece.rstrip(_C_ISSPACE)
                    if piece:
                        new.append(piece)
            frags = new
        return frags

    def _special_tokens_in(self, text: str) -> list[int]:
        """Ids of all special tokens whose text occurs somewhere in `text`."""
        trie = self._special_trie
        if trie is None:
            trie = self._build_trie()
        root, starts = trie
        if starts is None:
            return []
        found: set[int] = set()
        n = len(text)
        # `starts` finds, in C, the positions where some special token's first two characters
        # (or a one-character token) begin; the trie then lists every token starting there.
        for m in starts.finditer(text):
            node = root
            i = m.start()
            while i < n:
                node = node.get(text[i])
                if node is None:
                    break
                tid = node.get(None)  # key None: a token ends here
                if tid is not None:
                    found.add(tid)
                i += 1
        return list(found)

    def _build_trie(self):
        root: dict = {}
        heads: set[str] = set()
        for tid in self._special_order:
            text = self.tokens[tid]
            node = root
            for ch in text:
                node = node.setdefault(ch, {})
            # Same text twice: both would split identically; keep the id llama.cpp's
            # token_to_id holds (the last one), which is the one `get` returns.
            node[None] = self.token_to_id.get(text, tid)
            heads.add(text[:2])
        starts = None
        if heads:
            alts = "|".join(re.escape(h) for h in sorted(heads, key=len, reverse=True))
            starts = re.compile(f"(?=(?:{alts}))")
        self._special_trie = (root, starts)
        return self._special_trie

    # -----------------------------------------------------------------------------------------
    # detokenize
    # -----------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The raw bytes of one token's piece (llama.cpp's token_to_piece, lstrip=0).

        Control and unknown tokens give their text when `special`, else nothing; byte tokens
        give their byte; normal tokens their text with `▁` -> space (SPM) or mapped back from
        GPT-2's byte alphabet (BPE). Unused and undefined tokens give nothing.
        """
        tid = self._check(token_id)
        a = self._attr_list[tid]
        if not special and a & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        piece = self._pieces[tid]
        if piece is None:
            piece = self._pieces[tid] = self._piece(tid, a)
        return piece

    def _piece(self, tid: int, a: int) -> bytes:
        text = self.tokens[tid]
        if a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if a & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace("▁", " ").encode("utf-8", "surrogateescape")
            return _bpe_decode_text(text)
        if a & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def detokenize(self, ids: Iterable[int], special: bool = True,
                   remove_special: bool = False) -> str:
        """ids -> text as llama.cpp's llama_detokenize(remove_special, unparse_special=special).

        With an SPM space prefix the first piece loses one leading space (unless it follows a
        removed BOS); BPE vocabularies with `clean_spaces` drop the space before ? ! . , and
        before 's 'm 're 've, and around a lone apostrophe. Invalid UTF-8 (e.g. a character cut
        by the end of `ids`) becomes U+FFFD.
        """
        ids = [int(t) for t in ids]
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        chunks = []
        for tid in ids:
            piece = self.token_bytes(tid, special=special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            chunks.append(piece)
        text = b"".join(chunks)
        if self.clean_spaces and text:
            text = _clean_spaces(text)
        return text.decode("utf-8", "replace")

    def decoder(self, special: bool = True) -> StreamDecoder:
        """A fresh streaming decoder (see StreamDecoder)."""
        return StreamDecoder(self, special)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre_name!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos}, "
                f"eog={sorted(self.eog_ids)})")


def _bpe_decode_text(text: str) -> bytes:
    """A normal BPE token's text back to bytes (llama_decode_text)."""
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            # llama.cpp writes what it cannot map like this, token text and all
            utf8 = ch.encode("utf-8", "surrogateescape")
            whole = text.encode("utf-8", "surrogateescape")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode() + whole + b"]"
    return bytes(out)


# llama.cpp's clean_up_tokenization_spaces is three in-place passes over the bytes. Each is the
# same as one left-to-right substitution: pass 2 blanks the space it skips (so it cannot start
# the next match) just as a regex consumes it.
_CLEAN_1 = re.compile(rb" (?=[?!.,])")  # " ?" " !" " ." " ," -> drop the space
_CLEAN_2 = re.compile(rb" ' ")  # a lone apostrophe between spaces -> "'"
_CLEAN_3 = re.compile(rb" (?='(?:[sm]|re|ve))")  # " 's" " 'm" " 're" " 've" (not 't 'd 'll)


def _clean_spaces(text: bytes) -> bytes:
    text = _CLEAN_1.sub(b"", text)
    text = _CLEAN_2.sub(b"'", text)
    return _CLEAN_3.sub(b"", text)
