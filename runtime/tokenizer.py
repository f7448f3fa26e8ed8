"""The GGUF's tokenizer: text to token ids and back, exactly as llama.cpp does it.

`Tokenizer.encode(text, add_special, parse_special)` means what llama.cpp's
`llama_tokenize(vocab, text, add_special, parse_special)` means, and `decode(ids)` what
`llama_detokenize(vocab, ids, remove_special=False, unparse_special=False)` means (llama.cpp's
src/llama-vocab.cpp is the definition; tests/test_tokenizer.py checks both against llama.cpp's
own tokenizer tests and against strings run through llama.cpp).

The BPE itself (merges by rank, byte-level alphabet, byte fallback) is Hugging Face
`tokenizers`, built from the GGUF's vocabulary and merges. What this module adds is what
llama.cpp does around its BPE and `tokenizers` does differently:
- special and user-defined tokens are split out first, longest first over the whole text, the
  control ones only when parse_special is set (llama.cpp's tokenizer_st_partition);
- the pre-tokenizer is picked by `tokenizer.ggml.pre` (the GPT-2-style split regex for the Qwen
  families; Gemma 4's SentencePiece-style BPE replaces spaces by U+2581, splits only at newline
  runs, and looks a run of newlines up whole);
- BOS / EOS are added from the metadata flags, with llama.cpp's defaults;
- decoding hides control tokens, maps the byte-level alphabet (or U+2581) back, and applies
  llama.cpp's space clean-up for the vocabularies that have it.
"""
from __future__ import annotations

import codecs
import collections
import os
import re
import threading
from dataclasses import dataclass

from ggfuse.compiler.metadata import Metadata
from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError

__all__ = ["Tokenizer", "TextStream", "PreTokenizer", "PRE_TOKENIZERS"]

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class PreTokenizer:
    """What one `tokenizer.ggml.pre` value means to llama.cpp (llama-vocab.cpp, llm_tokenizer_bpe
    and the pre-type switch in llama_vocab::impl::load)."""
    name: str
    split_regex: str | None   # GPT-2-style split before byte-level BPE; None: newline runs (SPM-style)
    byte_level: bool          # GPT-2 byte-to-unicode alphabet; False: raw UTF-8 with <0xXX> fallback
    escape_whitespace: bool   # ' ' -> U+2581 before BPE, back when decoding
    clean_spaces: bool        # llama.cpp's detokenizer clean-up (" ," -> ",", " 's" -> "'s", ...)


# The split regexes as llama.cpp writes them: the case-insensitive contraction group of the
# models' tokenizer.json spelled out ('[sS] ...), which is what llama.cpp's custom splitters
# (unicode.cpp) implement.
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5: letter runs also take combining marks (\p{M}).
_QWEN35_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
                 r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_QWEN2 = PreTokenizer("qwen2", _QWEN2_REGEX, byte_level=True, escape_whitespace=False, clean_spaces=False)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp maps these names to LLAMA_VOCAB_PRE_TYPE_QWEN2 with clean_spaces off.
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "kormo": _QWEN2, "f2llmv2": _QWEN2,
    "qwen35": PreTokenizer("qwen35", _QWEN35_REGEX, byte_level=True, escape_whitespace=False, clean_spaces=False),
    "gemma4": PreTokenizer("gemma4", None, byte_level=False, escape_whitespace=True, clean_spaces=True),
}
# tokenizer.ggml.model -> the pre-tokenizer it implies (None: read tokenizer.ggml.pre), and the
# default BOS / EOS ids llama.cpp assumes when the metadata names none.
_MODELS = {"gpt2": (None, 11, 11), "gemma4": ("gemma4", None, None)}

# Token texts llama.cpp recognises (llama_vocab::impl::load): each list sets a role when the
# metadata names no id for it, and forces the token to CONTROL.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Tokens that end generation, by text (llama.cpp's special_eog_ids), besides the EOS / EOT / EOM
# and FIM pad / repo / separator ids.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
_SPECIAL_ID_KEYS = ("bos", "eos", "eot", "eom", "unk", "sep", "padding", "mask",
                    "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
_DEPRECATED_FIM_KEYS = {"prefix": "fim_pre", "suffix": "fim_suf", "middle": "fim_mid"}

_SPACE_ESCAPE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte b is written as chr(alphabet[b]); printable Latin-1 bytes
    stand for themselves, the other 68 are shifted to U+0100.. (so a space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for i, b in enumerate(shifted):
        chars[b] = chr(0x100 + i)
    return [chars[b] for b in range(256)]


BYTE_ALPHABET = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_ALPHABET)}


def clean_spaces(text: bytes) -> bytes:
    """llama.cpp's detokenizer clean-up (clean_up_tokenization_spaces), its three passes: drop the
    space before ? ! . , ; turn " ' " into "'"; drop the space before 's 'm 're 've."""
    text = re.sub(rb" (?=[?!.,])", b"", text)
    text = text.replace(b" ' ", b"'")
    return re.sub(rb" (?='(?:[sm]|re|ve))", b"", text)


class Tokenizer:
    """A GGUF's tokenizer. Build one with `Tokenizer.from_gguf(path)` (a model or a vocab-only
    file) or take a loaded model's `m.tokenizer`.

    encode(text, add_special=True, parse_special=False) -> list[int]
    decode(ids) -> str                       (invalid UTF-8 becomes U+FFFD)
    decode_bytes(ids, special=False) -> bytes
    token_to_piece(id, special=True) -> bytes
    Attributes: n_vocab, model, pre, bos_id, eos_id, eot_id (None when absent), add_bos, add_eos,
    eog_ids (frozenset: the ids that end generation), chat_template (str or None), tokens.
    """

    def __init__(self, metadata, source: str | None = None):
        """metadata: a mapping (or a GGUFFile: anything with .key(name, default)) holding the
        tokenizer.* keys. source names the file in error messages."""
        md = Metadata(metadata, path=source)   # every key read with its type (one-line errors)
        self.source = source
        self.model = md.str("tokenizer.ggml.model", None)
        if self.model is None:
            raise GGUFFormatError(source, "no tokenizer: metadata key 'tokenizer.ggml.model' is missing")
        if self.model not in _MODELS:
            raise UnsupportedError(source, f"tokenizer model '{self.model}' (tokenizer.ggml.model) is not "
                                           f"supported; supported: {', '.join(_MODELS)}")
        implied_pre, default_bos, default_eos = _MODELS[self.model]
        pre = implied_pre or md.str("tokenizer.ggml.pre", None)
        if pre is None:
            raise UnsupportedError(source, f"tokenizer model '{self.model}' needs tokenizer.ggml.pre (the "
                                           f"pre-tokenizer), which is missing; supported: {', '.join(PRE_TOKENIZERS)}")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedError(source, f"pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; "
                                           f"supported: {', '.join(PRE_TOKENIZERS)}")
        self.pre = pre
        self.pretok = PRE_TOKENIZERS[pre]

        tokens = md.str_array("tokenizer.ggml.tokens", None)
        if not tokens:
            raise GGUFFormatError(source, "metadata key 'tokenizer.ggml.tokens' must be a non-empty array of "
                                          "strings" + (" (it is missing)" if tokens is None else ""))
        # llama.cpp renames an empty token so that every token has a text.
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.n_vocab = len(self.tokens)
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        if len(self.token_to_id) != self.n_vocab:
            seen: set[str] = set()
            dup = next(t for t in self.tokens if t in seen or seen.add(t))
            raise GGUFFormatError(source, f"tokenizer.ggml.tokens holds '{dup}' twice")
        types = md.int_array("tokenizer.ggml.token_type", None)
        if types is None:
            types = [NORMAL] * self.n_vocab
        if len(types) < self.n_vocab:
            raise GGUFFormatError(source, f"tokenizer.ggml.token_type has {len(types)} "
                                          f"entries for {self.n_vocab} tokens")
        self.types = types[:self.n_vocab]
        self.merges = self._read_merges(md.str_array("tokenizer.ggml.merges", None))

        self.special_ids = self._special_ids(md, default_bos, default_eos)
        self._control = self._control_flags()          # also fills in EOT / FIM ids found by text
        self.eog_ids = self._eog_ids()
        self.bos_id, self.eos_id, self.eot_id = (self.special_ids[k] for k in ("bos", "eos", "eot"))
        self.add_bos = md.bool("tokenizer.ggml.add_bos_token", False)
        self.add_eos = md.bool("tokenizer.ggml.add_eos_token", False)
        if self.pretok is PRE_TOKENIZERS["gemma4"]:
            self.add_bos = True   # llama.cpp forces BOS for Gemma 4 whatever the flag says
        if self.add_bos and self.bos_id is None:
            raise GGUFFormatError(source, "tokenizer.ggml.add_bos_token is set but the vocabulary has no BOS token")
        if self.add_eos and self.eos_id is None:
            raise GGUFFormatError(source, "tokenizer.ggml.add_eos_token is set but the vocabulary has no EOS token")
        self.add_space_prefix = md.bool("tokenizer.ggml.add_space_prefix", False)
        self.chat_template = md.str("tokenizer.chat_template", None)

        # special tokens in llama.cpp's partition order: longest (in bytes) first
        order = sorted((i for i in range(self.n_vocab) if self._control[i] or self.types[i] in (USER_DEFINED, UNKNOWN)),
                       key=lambda i: (-len(self.tokens[i].encode("utf-8")), i))
        self._specials_all = [(i, self.tokens[i]) for i in order]
        self._specials_user = [(i, t) for i, t in self._specials_all
                               if not (self._control[i] or self.types[i] == UNKNOWN)]
        self._pieces = [self._piece(i) for i in range(self.n_vocab)]
        self._hf = self._build_bpe()
        # fragment text -> ids, the most recent MEMO_CHARS of text: a chat client re-sends the
        # whole conversation every turn, and its earlier messages are the same fragments again
        self._memo: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self._memo_chars = 0
        self._memo_lock = threading.Lock()
        self._finders = self._build_finders()

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of a GGUF file (a model, or a vocab-only file without tensors)."""
        from ggfuse.compiler.gguf_file import GGUFFile
        gf = path if hasattr(path, "key") else GGUFFile(path)
        return cls(gf, source=gf.path)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"

    # -- construction ----------------------------------------------------------------------------

    def _read_merges(self, merges) -> list[tuple[str, str]]:
        if merges is None:
            raise GGUFFormatError(self.source, f"tokenizer model '{self.model}' needs tokenizer.ggml.merges, "
                                               f"which is missing")
        # llama.cpp splits at the first space after the first character; a merge without one
        # becomes a pair of empty strings, which never matches
        return [(m[:c], m[c + 1:]) for m in merges if (c := m.find(" ", 1)) > 0]

    def _check_merges(self) -> None:
        """Name the first merge that `tokenizers` refused (it needs both halves and their
        concatenation in the vocabulary; llama.cpp files always have them)."""
        vocab = self.token_to_id
        for i, (a, b) in enumerate(self.merges):
            for x in (a, b, a + b):
                if x not in vocab:
                    raise GGUFFormatError(self.source, f"tokenizer.ggml.merges: merge {i} {a + ' ' + b!r} names "
                                                       f"{x!r}, which is not in tokenizer.ggml.tokens")

    def _special_ids(self, md, default_bos, default_eos) -> dict[str, int | None]:
        n = self.n_vocab
        ids: dict[str, int | None] = {k: None for k in _SPECIAL_ID_KEYS}
        ids["bos"] = default_bos if default_bos is not None and default_bos < n else None
        ids["eos"] = default_eos if default_eos is not None and default_eos < n else None
        for key, role in [*((k, k) for k in _SPECIAL_ID_KEYS), *_DEPRECATED_FIM_KEYS.items()]:
            v = md.int(f"tokenizer.ggml.{key}_token_id", None)
            # llama.cpp ignores an out-of-range id (keeps the default)
            if v is not None and 0 <= v < n:
                ids[role] = v
        return ids

    def _control_flags(self) -> list[bool]:
        """Which tokens llama.cpp treats as control: CONTROL-typed ones, plus tokens whose text
        gives them a role (EOT, EOM, FIM, EOG) whatever their type; the role ids are set here too."""
        control = [t == CONTROL for t in self.types]
        by_role = (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items())
        for role, texts in by_role:
            if self.special_ids[role] is None:
                found = [self.token_to_id[t] for t in texts if t in self.token_to_id]
                if found:
                    # llama.cpp walks an unordered map and keeps the first hit; with several
                    # candidates present that order is unspecified, so take the lowest id
                    self.special_ids[role] = min(found)
                    control[min(found)] = True
        for t in _EOG_TEXTS:
            if t in self.token_to_id:
                control[self.token_to_id[t]] = True
        return control

    def _eog_ids(self) -> frozenset[int]:
        ids = self.special_ids
        eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids[r] is not None}
        eog |= {self.token_to_id[t] for t in _EOG_TEXTS if t in self.token_to_id}
        eog |= {ids[r] for r in ("eos", "eot", "eom") if ids[r] is not None}
        text = {self.tokens[i]: i for i in eog}
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
        if "<|end|>" in text and (("<|return|>" in text and "<|call|>" in text)
                                  or ("<|calls|>" in text and "<|flush|>" in text)):
            eog.discard(text["<|end|>"])
            self.types[text["<|end|>"]] = USER_DEFINED
            self._control[text["<|end|>"]] = False
        # Gemma 4 has an ordinary "</s>"
        if "</s>" in text and "<|tool_response>" in text:
            eog.discard(text["</s>"])
            self.types[text["</s>"]] = NORMAL
            self._control[text["</s>"]] = False
        return frozenset(eog)

    def _piece(self, i: int) -> bytes:
        """llama.cpp's token_to_piece(id, special=True): the bytes a token stands for."""
        text, kind = self.tokens[i], self.types[i]
        if self._control[i] or kind in (UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if kind == NORMAL:
            if self.pretok.escape_whitespace:
                return text.replace(_SPACE_ESCAPE, " ").encode("utf-8")
            if self.pretok.byte_level:
                out = bytearray()
                for ch in text:
                    b = _CHAR_TO_BYTE.get(ch)
                    if b is None:   # not in the byte alphabet: llama.cpp writes a marker
                        out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
                    else:
                        out.append(b)
                return bytes(out)
            return text.encode("utf-8")
        if kind == BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            if m is None:
                raise GGUFFormatError(self.source, f"token {i} {text!r} has type BYTE but is not written <0xXX>")
            return bytes([int(m.group(1), 16)])
        return b""   # UNUSED and unknown types decode to nothing

    def _build_bpe(self):
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers
        # checked first: for some merges naming tokens outside the vocabulary `tokenizers` panics
        # (a pyo3 PanicException, a BaseException) instead of raising
        self._check_merges()
        try:
            bpe = models.BPE(self.token_to_id, self.merges, byte_fallback=not self.pretok.byte_level)
        except BaseException as e:  # noqa: BLE001 -- a bare Exception or a Rust panic, from file contents
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise GGUFFormatError(self.source, f"tokenizer.ggml.tokens / tokenizer.ggml.merges refused by the BPE "
                                               f"builder ({type(e).__name__}: {e})") from None
        hf = HFTokenizer(bpe)
        if self.pretok.split_regex is not None:
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(self.pretok.split_regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        # SPM-style (Gemma 4): no pre-tokenizer; _encode_fragment splits at newline runs and
        # hands each piece over as one word.
        return hf

    # -- encode ----------------------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special tokens out of the text, as llama.cpp does: each special token in turn,
        longest first, cuts every text fragment at its non-overlapping occurrences. Without
        parse_special only user-defined tokens are cut out (control and unknown ones are text)."""
        frags: list[str | int] = [text]
        present = self._specials_in(text, parse_special)
        for tid, s in (self._specials_all if parse_special else self._specials_user):
            if s not in present or s not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(s)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def _specials_in(self, text: str, parse_special: bool) -> set:
        """A superset of the special tokens that occur in text, found in one regex pass instead
        of one search per special token (hundreds: Qwen's vocabulary has 294). The pass finds,
        at each position outside an earlier match, the first special in partition order that
        starts there; positions inside a match are tried one by one; and each special found
        brings the specials it contains. Every occurrence of a special starts at some position,
        where the special found is it or one that begins with it (the partition order is longest
        first), so none is missed."""
        finder, contained = self._finders[parse_special]
        if finder is None:
            return set()
        found = set()
        for m in finder.finditer(text):
            found.add(m.group())
            for q in range(m.start() + 1, m.end()):
                inner = finder.match(text, q)
                if inner is not None:
                    found.add(inner.group())
        return found.union(*(contained[s] for s in found)) if found else found

    def _build_finders(self) -> dict:
        out = {}
        for parse_special, specials in ((True, self._specials_all), (False, self._specials_user)):
            texts = [s for _, s in specials]
            if not texts:
                out[parse_special] = (None, {})
                continue
            finder = re.compile("|".join(re.escape(s) for s in texts))
            contained = {s: {t for t in texts if t in s} for s in texts}
            out[parse_special] = (finder, contained)
        return out

    MEMO_CHARS = 1 << 23
    MEMO_MIN_CHARS = 1

    def _encode_fragments(self, texts: list[str]) -> list[list[int]]:
        """The BPE ids of each text fragment (special tokens already split out). A fragment's ids
        depend on its text alone, so they are remembered (short ones too: encoding even a short
        fragment costs the BPE library's batch set-up)."""
        out: list = [None] * len(texts)
        with self._memo_lock:
            for k, t in enumerate(texts):
                ids = self._memo.get(t) if len(t) >= self.MEMO_MIN_CHARS else None
                if ids is not None:
                    self._memo.move_to_end(t)
                    out[k] = list(ids)
        todo = [k for k, ids in enumerate(out) if ids is None]
        if todo:
            fresh = self._encode_fresh([texts[k] for k in todo])
            with self._memo_lock:
                for k, ids in zip(todo, fresh):
                    out[k] = ids
                    if self.MEMO_MIN_CHARS <= len(texts[k]) <= self.MEMO_CHARS and texts[k] not in self._memo:
                        self._memo[texts[k]] = tuple(ids)
                        self._memo_chars += len(texts[k])
                while self._memo_chars > self.MEMO_CHARS:
                    self._memo_chars -= len(self._memo.popitem(last=False)[0])
        return out

    def _encode_fresh(self, texts: list[str]) -> list[list[int]]:
        if self.pretok.split_regex is not None:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        out = []
        for text in texts:
            if self.pretok.escape_whitespace:
                text = text.replace(" ", _SPACE_ESCAPE)
            words = re.findall(r"[^\n]+|\n+", text)
            ids: list[int] = []
            bpe_words = []
            slots = []
            for w in words:
                # a run of newlines that is itself a token is taken whole (llama.cpp's Gemma 4 rule)
                if w[0] == "\n" and w in self.token_to_id:
                    ids.append(self.token_to_id[w])
                else:
                    slots.append(len(ids))
                    ids.append(-1)
                    bpe_words.append(w)
            if bpe_words:
                enc = self._hf.encode_batch(bpe_words, add_special_tokens=False)
                for slot, e in zip(reversed(slots), reversed(enc)):
                    ids[slot:slot + 1] = e.ids
            out.append(ids)
        return out

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama_tokenize(vocab, text, add_special, parse_special).

        add_special: add BOS / EOS where the GGUF asks for them (tokenizer.ggml.add_bos_token, ...).
        parse_special: control tokens written in the text (e.g. "<|im_start|>") become their ids;
        otherwise they are tokenized as plain text. User-defined tokens are always matched.
        """
        if not isinstance(text, str):
            raise GGFuseError(self.source, f"encode() takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GGFuseError(self.source, f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        frags = self._partition(text, parse_special) if text else []
        raw = [f for f in frags if isinstance(f, str)]
        encoded = iter(self._encode_fragments(raw)) if raw else iter(())
        for f in frags:
            if isinstance(f, int):
                out.append(f)
            else:
                out.extend(next(encoded))
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    # -- decode ----------------------------------------------------------------------------------

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.n_vocab:
                raise GGFuseError(self.source, f"token id {i} is outside the vocabulary 0..{self.n_vocab - 1}")
        return ids

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes of one token, as llama_token_to_piece(vocab, id, ..., lstrip=0, special):
        with special=False control tokens give b""."""
        (i,) = self._check_ids([token_id])
        if not special and self._hidden(i):
            return b""
        return self._pieces[i]

    def _hidden(self, i: int) -> bool:
        return self._control[i] or self.types[i] == UNKNOWN

    def decode_bytes(self, ids, special: bool = False) -> bytes:
        """The bytes of `ids`, as llama_detokenize(vocab, ids, remove_special=False,
        unparse_special=special)."""
        ids = self._check_ids(ids)
        pieces = [b"" if not special and self._hidden(i) else self._pieces[i] for i in ids]
        if self.add_space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]   # llama.cpp strips one leading space of the first token
        text = b"".join(pieces)
        return clean_spaces(text) if self.pretok.clean_spaces else text

    def decode(self, ids, special: bool = False) -> str:
        """The text of `ids` (llama_detokenize with remove_special=False, unparse_special=special);
        bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", "replace")

    def is_eog(self, token_id: int) -> bool:
        """Does this token end generation (EOS, EOT, <|im_end|>, ...)?"""
        return int(token_id) in self.eog_ids

    def stream(self) -> TextStream:
        return TextStream(self)


def _settled(raw: bytearray) -> int:
    """The largest p with no space among raw[p-3:p] (0 if none): clean_spaces(raw + later) is
    then clean_spaces(raw[:p]) + clean_spaces(raw[p:] + later), whatever comes later. (Each of
    clean_spaces' patterns starts with a space and spans at most four bytes, so none can
    straddle p; its passes only delete spaces, so the three bytes before p survive each pass.)"""
    p = len(raw)
    while p >= 3:
        space = raw.rfind(b" ", p - 3, p)
        if space < 0:
            return p
        p = space
    return 0


class TextStream:
    """Incremental decoding: push() token ids one at a time and get the text they add, never
    half of a multi-byte character; the pieces joined (with flush()) equal decode(all ids).

    Where the vocabulary cleans up spaces (" ," -> ","), text is handed out up to the last run
    of three non-space bytes: what comes later cannot change the clean-up before it (see
    _settled), while a space closer to the end may still be dropped."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._raw = bytearray()   # bytes not handed out yet
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        (i,) = self.tok._check_ids([token_id])
        self.ids.append(i)
        if not self.tok._hidden(i):
            piece = self.tok._pieces[i]
            if self.tok.add_space_prefix and len(self.ids) == 1 and piece.startswith(b" "):
                piece = piece[1:]
            self._raw += piece
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if not self.tok.pretok.clean_spaces:
            cut = len(self._raw)
            ready = bytes(self._raw)
        else:
            cut = len(self._raw) if final else _settled(self._raw)
            ready = clean_spaces(bytes(self._raw[:cut]))
        del self._raw[:cut]
        return self._utf8.decode(ready, final)
