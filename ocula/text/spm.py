"""SentencePiece-style BPE encoding (``tokenizer.ggml.model == "llama"``) straight from a scored vocabulary.

The result is token for token what HF `tokenizers` gives for a BPE model whose merges are every split
of a vocabulary token into two vocabulary tokens, ordered best score first, then longer left piece,
longer right piece, lower token id (transformers' GGUF converter; it reproduces llama.cpp's
score-driven SPM merging). That merge list is never built: a pair's place in it follows from the
merged token's score rank and the two piece lengths, so all that is needed is "text -> score rank"
for the normal tokens. It is kept in flat arrays (`TokenTable`), not in Python strings and dicts:
Gemma 3's 262k-token vocabulary takes ~7 MiB here, against ~35 MiB as a dict of str and ~75 MiB in
HF's vocabulary and merge maps (plus a 500k-entry merge list while building, ~3 s).

Merging follows HF's `Word::merge_all`: the adjacent pair with the lowest (merge rank, position)
merges until none is left. Text is cut into words before each ``▁`` that no vocabulary token reaches
across (the character before it never precedes ``▁`` inside a token), so words merge independently,
and repeated words and repeated lookups hit small caches.
"""
from __future__ import annotations

import re
from array import array
from heapq import heapify, heappop, heappush
from itertools import accumulate

import numpy as np

from ocula.errors import RequestError

SPACE = "▁"
# Rust's char::is_whitespace (HF's Strip normalizer), which differs from str.isspace on \x1c-\x1f
_RUST_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                    + "\u2028\u2029\u202f\u205f\u3000")
_CACHE_WORDS = 10_000  # word -> ids
_CACHE_LOOKUPS = 1 << 16  # text -> rank (or -1)
_SHORT_WORD = 32  # longer words merge with a heap (a scan per merge would be quadratic)
_NORMAL = 1


class TokenTable:
    """Every token's text in one UTF-8 blob (indexable like a list of str), with an open-addressing
    hash index from text to score rank over the normal (mergeable) tokens."""

    def __init__(self, tokens: list[str], types, scores):
        encoded = [t.encode("utf-8", "surrogatepass") for t in tokens]
        self._blob = b"".join(encoded)
        self._offsets = array("I", accumulate(map(len, encoded), initial=0))
        del encoded
        normal = np.flatnonzero(np.frombuffer(bytes(types), np.uint8) == _NORMAL)
        bits = max(2 * len(normal), 1).bit_length()
        self._mask = mask = (1 << bits) - 1
        slots = array("i", [-1]) * (1 << bits)
        for i in normal.tolist():  # a spelling shared by normal tokens belongs to the last one
            h = hash(tokens[i]) & mask
            while slots[h] >= 0 and tokens[slots[h]] != tokens[i]:
                h = (h + 1) & mask
            slots[h] = i
        # merge order: best score first, equal scores by id
        slot_ids = np.frombuffer(slots, np.int32)
        winners = np.sort(slot_ids[slot_ids >= 0])
        score = np.asarray(scores, np.float64)[winners]
        by_score = np.argsort(-score, kind="stable")
        order = winners[by_score]
        rank_by_id = np.full(len(tokens), -1, np.int32)
        rank_by_id[order] = np.arange(len(order), dtype=np.int32)
        self._slots = array("i", np.where(slot_ids >= 0, rank_by_id[np.maximum(slot_ids, 0)], -1).astype(np.int32).tobytes())
        self.id_by_rank = array("i", order.astype(np.int32).tobytes())
        self.group: array | None = None
        sorted_scores = score[by_score]
        ties = np.flatnonzero(sorted_scores[1:] == sorted_scores[:-1]) + 1
        if len(ties):  # tokens sharing a score merge as one group: (group, -len left, -len right, id)
            starts = np.ones(len(order), bool)
            starts[ties] = False
            self.group = array("i", np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
                               .astype(np.int32).tobytes())
        texts = [tokens[i] for i in order.tolist()]
        self.max_len = max(map(len, texts), default=1)
        self.glue = {t[k - 1] for t in texts if t.find(SPACE, 1) > 0 for k in range(1, len(t)) if t[k] == SPACE}

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.token_bytes(i).decode("utf-8", "surrogatepass")

    def token_bytes(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._blob[self._offsets[i] : self._offsets[i + 1]]

    def rank(self, text: str) -> int:
        """Score rank of the normal token spelled `text`, -1 if there is none."""
        slots, mask, offsets, blob = self._slots, self._mask, self._offsets, self._blob
        h = hash(text) & mask
        u = slots[h]
        if u < 0:
            return -1
        b = text.encode("utf-8", "surrogatepass")
        n = len(b)
        while True:
            i = self.id_by_rank[u]
            start = offsets[i]
            if offsets[i + 1] - start == n and blob.startswith(b, start):
                return u
            h = (h + 1) & mask
            u = slots[h]
            if u < 0:
                return -1


def trie_regex(words) -> str:
    """A regex matching any of `words`, the longest one where several start at the same place."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        alts = [re.escape(ch) + pattern(child) for ch, child in node.items() if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


class SpmEncoder:
    """Text -> token ids for a SentencePiece BPE vocabulary (see the module docstring)."""

    def __init__(self, tokens: list[str], types, scores, *, unk_id: int | None, add_space_prefix: bool,
                 remove_extra_whitespaces: bool):
        self.table = table = TokenTable(tokens, types, scores)
        self._width = table.max_len + 1
        self._no_merge = (len(table.id_by_rank) + 1) ** 2 * self._width ** 2  # above every merge rank
        # spellings HF's vocabulary gives another id: non-normal tokens, and normal ones a later
        # non-normal token re-uses (usually none)
        self._other: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if types[i] != _NORMAL:
                self._other[t] = i
            elif t in self._other:
                del self._other[t]
        self._override = {t: i for t, i in self._other.items() if table.rank(t) >= 0}
        self._seen: dict[str, int] = {}  # lookup cache: text -> rank or -1
        self._pair = self._pair_rank()
        self._byte_symbols = [self._symbol(f"<0x{b:02X}>") for b in range(256)]
        self._unk = self.token_id(tokens[unk_id]) if unk_id is not None else None

        self.add_space_prefix = add_space_prefix
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self._added: dict[str, int] = {}
        self._special: set[str] = set()
        self._added_re = None
        # "▁" starts a new word unless the character before it can precede "▁" inside a token, or a
        # character can vanish (no byte token for it and no <unk>), making its neighbours adjacent
        vanish = self._unk is None and any(i is None for _, i in self._byte_symbols)
        if table.rank(SPACE) >= 0 and not vanish:
            glue = "".join(map(re.escape, sorted(table.glue)))
            self._word_re = re.compile((f"(?<![{glue}])" if glue else "") + f"(?={SPACE})")
        else:
            self._word_re = None
        self._cache: dict[str, list[int]] = {}

    def set_added_tokens(self, added: dict[str, int], special: set[str]) -> None:
        """Whole-match tokens (text -> id), found before anything else; `special` ones only when parsed."""
        self._added, self._special = added, special
        self._added_re = re.compile(trie_regex(added)) if added else None

    def token_id(self, text: str) -> int | None:
        """The id HF's vocabulary gives `text` (the last token spelled so)."""
        i = self._other.get(text)
        if i is not None:
            return i
        u = self.table.rank(text)
        return None if u < 0 else self.table.id_by_rank[u]

    def _symbol(self, text: str) -> tuple[str | None, int | None]:
        """(mergeable text or None, id) of a starting symbol spelled `text`."""
        return (text if self.table.rank(text) >= 0 else None), self.token_id(text)

    def _rank(self, text: str) -> int:
        """`table.rank` through the lookup cache (callers try `_seen` first; this is the miss path)."""
        u = self.table.rank(text)
        if len(self._seen) >= _CACHE_LOOKUPS:
            self._seen.clear()
        self._seen[text] = u
        return u

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, parse_special: bool = True, exact: bool = False) -> list[int]:
        """`exact`: the tokens spell exactly `text` (no space prefix, no whitespace clean-up), as a grammar
        engine needs for the text it forces."""
        ids: list[int] = []
        start = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                tok = m.group()
                if not parse_special and tok in self._special:
                    continue  # as HF: the match is skipped, its text stays plain (not searched again)
                if m.start() > start:
                    self._encode_plain(text[start : m.start()], ids, exact)
                ids.append(self._added[tok])
                start = m.end()
        if start < len(text):
            self._encode_plain(text[start:], ids, exact)
        return ids

    def _encode_plain(self, text: str, ids: list[int], exact: bool = False) -> None:
        if self.remove_extra_whitespaces and not exact:
            text = re.sub(" {2,}", " ", text.strip(_RUST_WHITESPACE))
        text = text.replace(" ", SPACE)
        if not text:
            return
        if self.add_space_prefix and not exact and not text.startswith(SPACE):
            text = SPACE + text
        cache = self._cache
        for w in self._word_re.split(text) if self._word_re is not None else (text,):
            if not w:
                continue
            got = cache.get(w)
            if got is None:
                got = self._merge(w)
                if len(cache) >= _CACHE_WORDS:
                    cache.clear()
                cache[w] = got
            ids.extend(got)

    def _start_symbols(self, word: str) -> tuple[list[str | None], list[int | None]]:
        """Each character's symbol, as HF's `merge_word`: a vocabulary token, else its UTF-8 bytes'
        tokens (byte fallback), else one unknown token for a run of such characters."""
        other = self._other
        syms: list[str | None] = []  # mergeable text; None: a fixed id (byte, unknown, control...)
        fixed: list[int | None] = []
        unk = None
        for ch in word:
            u = self._seen.get(ch)
            mergeable = (self._rank(ch) if u is None else u) >= 0
            if mergeable or ch in other:
                if unk is not None:
                    syms.append(None)
                    fixed.append(unk)
                    unk = None
                syms.append(ch if mergeable else None)
                fixed.append(None if mergeable else other[ch])
                continue
            try:
                pieces = [self._byte_symbols[b] for b in ch.encode("utf-8")]
            except UnicodeEncodeError:
                raise RequestError(f"text contains a lone surrogate {ch!r}, which is not valid Unicode") from None
            if all(i is not None for _, i in pieces):
                for s, i in pieces:  # HF adds byte tokens without first flushing a pending unknown
                    syms.append(s)
                    fixed.append(None if s is not None else i)
            elif self._unk is not None:
                unk = self._unk
        if unk is not None:
            syms.append(None)
            fixed.append(unk)
        return syms, fixed

    def _pair_rank(self):
        """A function (a, b) -> merge rank of the pair (lower merges first), or `_no_merge`."""
        get, lookup = self._seen.get, self._rank
        w, none, group, n = self._width, self._no_merge, self.table.group, len(self.table.id_by_rank)

        def distinct_scores(a: str, b: str) -> int:  # the merged token's rank, then the longer left piece
            t = a + b
            u = get(t)
            if u is None:
                u = lookup(t)
            return none if u < 0 else u * w + w - len(a)

        def shared_scores(a: str, b: str) -> int:  # (score group, longer left, longer right, id)
            t = a + b
            u = get(t)
            if u is None:
                u = lookup(t)
            return none if u < 0 else ((group[u] * w + w - len(a)) * w + w - len(b)) * n + u

        return distinct_scores if group is None else shared_scores

    def _merge(self, word: str) -> list[int]:
        get = self._seen.get
        if all((get(ch) if ch in self._seen else self._rank(ch)) >= 0 for ch in word):
            if len(word) <= _SHORT_WORD:
                return self._merge_short(word)
            syms: list[str | None] = list(word)
            fixed: list[int | None] = []
        else:
            syms, fixed = self._start_symbols(word)
        pair, none = self._pair, self._no_merge
        n = len(syms)
        heap = []
        for p in range(n - 1):
            a, b = syms[p], syms[p + 1]
            if a is not None and b is not None:
                k = pair(a, b)
                if k != none:
                    heap.append((k, p, a + b))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heapify(heap)
        while heap:  # entries go stale when a neighbour merges; skip those, as HF does
            _, p, t = heappop(heap)
            a = syms[p]
            q = nxt[p]
            if a is None or q < 0:
                continue
            b = syms[q]
            if b is None or len(a) + len(b) != len(t) or a + b != t:
                continue
            syms[p] = t
            syms[q] = None
            r = nxt[q]
            nxt[p] = r
            o = prv[p]
            if o >= 0 and syms[o] is not None:
                k = pair(syms[o], t)
                if k != none:
                    heappush(heap, (k, o, syms[o] + t))
            if r >= 0:
                prv[r] = p
                if syms[r] is not None:
                    k = pair(t, syms[r])
                    if k != none:
                        heappush(heap, (k, p, t + syms[r]))
        live = []
        p = 0
        while p >= 0:
            live.append(p)
            p = nxt[p]
        merged = self._final_ids([syms[p] for p in live if syms[p] is not None])[::-1]
        return [fixed[p] if syms[p] is None else merged.pop() for p in live]

    def _merge_short(self, word: str) -> list[int]:
        """`_merge` for a short word of mergeable characters: the lowest-ranked adjacent pair (leftmost
        among equals) merges until none is left, which is what the heap ends up doing, with less work."""
        if self.table.group is not None:
            return self._merge_short_shared_scores(word)
        # distinct scores: a pair's rank is (merged token's rank, longer left piece), inlined for speed
        get, miss, w, none = self._seen.get, self._rank, self._width, self._no_merge
        syms = list(word)
        ranks = [get(word[p : p + 2]) for p in range(len(word) - 1)]
        keys = [none if u < 0 else u * w + w - 1 for p, u in enumerate(ranks)
                for u in ((miss(word[p : p + 2]) if u is None else u),)]
        while keys:
            k = min(keys)
            if k == none:
                break
            p = keys.index(k)
            t = syms[p] + syms[p + 1]
            syms[p : p + 2] = [t]
            del keys[p]
            if p > 0:
                a = syms[p - 1]
                u = get(a + t)
                if u is None:
                    u = miss(a + t)
                keys[p - 1] = none if u < 0 else u * w + w - len(a)
            if p < len(keys):
                m = t + syms[p + 1]
                u = get(m)
                if u is None:
                    u = miss(m)
                keys[p] = none if u < 0 else u * w + w - len(t)
        return self._final_ids(syms)

    def _merge_short_shared_scores(self, word: str) -> list[int]:
        pair, none = self._pair, self._no_merge
        syms = list(word)
        keys = [pair(syms[p], syms[p + 1]) for p in range(len(syms) - 1)]
        while keys:
            k = min(keys)
            if k == none:
                break
            p = keys.index(k)
            t = syms[p] + syms[p + 1]
            syms[p : p + 2] = [t]
            del keys[p]
            if p > 0:
                keys[p - 1] = pair(syms[p - 1], t)
            if p < len(keys):
                keys[p] = pair(t, syms[p + 1])
        return self._final_ids(syms)

    def _final_ids(self, syms: list[str]) -> list[int]:
        get, ids = self._seen.get, self.table.id_by_rank
        out = [ids[u] if u is not None else ids[self._rank(t)] for t in syms for u in (get(t),)]
        if self._override:
            out = [self._override.get(t, i) for t, i in zip(syms, out)]
        return out
