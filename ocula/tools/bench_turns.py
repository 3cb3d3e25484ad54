"""`ocula bench` two-turn chat: time to first token of a first turn with an image and of a second turn
that re-sends the same conversation (image included), through each engine's caches.

Turn 1: [user: image + QUESTIONS[0]] → greedy answer of ANSWER_TOKENS tokens (EOS ignored).
Turn 2: [user: image + QUESTIONS[0], assistant: that answer (text, control tokens dropped as a client
        sees it), user: QUESTIONS[1]] → first token.
TTFT is wall time from the call to the first sampled token: reading and decoding the image file,
hashing it, preprocessing + encoding (unless cached), the chat template, tokenization and prefill.
Every repetition starts cold: ocula gets a fresh image-embedding cache and an empty KV cache for
turn 1 (turn 2 may reuse both); llama.cpp's KV memory is cleared.

llama.cpp: llama-cpp-python's chat handlers (Llava15ChatHandler, MTMDChatHandler) clear the KV cache
and re-encode every image on every call, so they cannot reuse anything across turns. The llama.cpp
side here therefore does what llama-server does, through the C API: the prompt is tokenized with
`mtmd_tokenize` (bitmap id = hash of the decoded pixels), the longest prefix that matches the
previous sequence (text token ids; image chunks by id, never split) is kept in the KV cache, the rest
is removed and evaluated with `mtmd_helper_eval_chunk_single` / `llama_decode`.
"""
from __future__ import annotations

import hashlib
import time

QUESTIONS = ("Describe this image in one sentence.", "What colors stand out in it?")
ANSWER_TOKENS = 8


def _messages(image: str, answer: str | None) -> list[dict]:
    first = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTIONS[0]}]}
    if answer is None:
        return [first]
    return [first, {"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]


def turn_summary(first: list[float], second: list[float], details: list[dict], summary) -> dict:
    """The JSON fields: both TTFTs, the per-repetition ratio second / first, and what turn 2 reused."""
    ratios = [b / a for a, b in zip(first, second) if a > 0]
    return {
        "ttft_first_turn_ms": summary(first),
        "ttft_second_turn_ms": summary(second),
        "second_turn_ttft": summary(ratios),
        "chat": {"questions": list(QUESTIONS), "answer_tokens": ANSWER_TOKENS, "image": details[0]["image"],
                 "turns": details},
    }


# ----------------------------------------------------------------------------- ocula


def run_ocula_turns(model, image: str, reps: int, summary, image_options: dict | None = None) -> dict:
    """Two-turn chat through `Model.chat` (the public API) with the engine's caches as a server uses them."""
    from ocula.engine.multimodal import EmbeddingCache

    vision = model.vision
    first, second, details = [], [], []
    saved_prefix = model.engine.prefix_cache
    try:
        for _ in range(reps):
            vision.cache = EmbeddingCache(vision.cache.max_bytes)  # cold: no embeddings from earlier runs
            model.engine.prefix_cache = False  # turn 1 starts from an empty KV cache; its KV stays for turn 2
            t0 = time.perf_counter()
            r1 = model.chat(_messages(image, None), max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True,
                            **(image_options or {}))
            ms1 = (time.perf_counter() - t0) * 1000 - r1.timings.generation_ms
            model.engine.prefix_cache = True
            hits = vision.cache.hits
            t0 = time.perf_counter()
            r2 = model.chat(_messages(image, r1.text), max_tokens=1, temperature=0.0, ignore_eos=True,
                            **(image_options or {}))
            ms2 = (time.perf_counter() - t0) * 1000 - r2.timings.generation_ms
            first.append(ms1)
            second.append(ms2)
            details.append({
                "image": image,
                "prompt_tokens": [r1.prompt_tokens, r2.prompt_tokens],
                "cached_tokens": [r1.timings.cached_tokens, r2.timings.cached_tokens],
                "images_encoded": [1, 0 if vision.cache.hits > hits else 1],
                "prefill_ms": [round(r1.timings.prompt_ms, 1), round(r2.timings.prompt_ms, 1)],
                "answer": r1.text,
            })
    finally:
        model.engine.prefix_cache = saved_prefix
    return turn_summary(first, second, details, summary)


# ----------------------------------------------------------------------------- llama.cpp

# what the chat templates write for one image → libmtmd's marker (mtmd adds the begin/end-of-image
# tokens itself); HF's Gemma 3 processor puts blank lines around the image
LLAMA_IMAGE_MARKUP = {
    "qwen2vl_merger": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2.5vl_merger": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3vl_merger": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "internvl": "<IMG_CONTEXT>",
}


class LlamaTurns:
    """The llama.cpp side: one context, a record of what its KV cache holds, llama-server's reuse rule."""

    def __init__(self, ll, mtmd, model, mctx, projector: str, n_ctx: int, threads: int, n_batch: int = 512):
        import ctypes

        from ocula.text.chat import ChatTemplate

        self.ll, self.mtmd, self.ctypes, self.mctx, self.n_batch = ll, mtmd, ctypes, mctx, n_batch
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = ll.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context for the two-turn chat")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        source = ll.llama_model_chat_template(model, None)
        buf = ctypes.create_string_buffer(256)
        ll.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
        self.template = ChatTemplate(source.decode() if source else None, self._text(ll.llama_vocab_bos(self.vocab)),
                                     self._text(ll.llama_vocab_eos(self.vocab)), buf.value.decode())
        marker = mtmd.mtmd_default_marker().decode()
        markup = LLAMA_IMAGE_MARKUP.get(projector, "<image>")
        self.image_text = (markup, f"\n\n{marker}\n\n" if projector == "gemma3" else marker)
        self.keys: list = []  # per cached position-slot: token id, or (image id, index)
        self.n_past = 0

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)

    def _text(self, token: int) -> str:
        if token < 0:
            return ""
        return (self.ll.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", errors="replace")

    def detokenize(self, ids: list[int]) -> str:
        out = b""
        buf = self.ctypes.create_string_buffer(256)
        for t in ids:
            n = self.ll.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)  # control tokens → ""
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def reset(self) -> None:
        self.ll.llama_memory_clear(self.mem, True)
        self.keys, self.n_past = [], 0

    def _decode(self, tokens: list[int], pos0: int) -> None:
        b = self.batch
        for s in range(0, len(tokens), self.n_batch):
            part = tokens[s : s + self.n_batch]
            for i, t in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + s + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if s + i == len(tokens) - 1 else 0
            b.n_tokens = len(part)
            if self.ll.llama_decode(self.ctx, b) != 0:
                raise SystemExit("llama_decode failed in the two-turn chat")

    def _argmax(self) -> int:
        import numpy as np

        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def turn(self, image: str, messages: list[dict], n_gen: int) -> dict:
        """Read + decode the image, tokenize, reuse the cached prefix, evaluate the rest, sample n_gen
        tokens greedily. Returns the timings and token counts."""
        ll, mtmd, ctypes = self.ll, self.mtmd, self.ctypes
        t0 = time.perf_counter()
        data = open(image, "rb").read()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bmp = mtmd.mtmd_helper_bitmap_init_from_buf(self.mctx, buf, len(data), False)
        if not bmp:
            raise SystemExit(f"llama.cpp could not decode {image}")
        pixels = ctypes.string_at(mtmd.mtmd_bitmap_get_data(bmp), mtmd.mtmd_bitmap_get_n_bytes(bmp))
        mtmd.mtmd_bitmap_set_id(bmp, hashlib.blake2b(pixels, digest_size=16).hexdigest().encode())
        text = self.template.render(messages).replace(*self.image_text).encode()
        chunks = mtmd.mtmd_input_chunks_init()
        inp = mtmd.mtmd_input_text(text, len(text), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bmp)
        if mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
            raise SystemExit("mtmd_tokenize failed in the two-turn chat")
        # the prompt as key slots (one per token) and the chunk each slot belongs to
        parts = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == 0:  # MTMD_INPUT_CHUNK_TYPE_TEXT
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                parts.append((chunk, [ptr[j] for j in range(n.value)]))
            else:
                cid = mtmd.mtmd_input_chunk_get_id(chunk)
                parts.append((chunk, [(cid, j) for j in range(mtmd.mtmd_input_chunk_get_n_tokens(chunk))]))
        keys = [k for _, ks in parts for k in ks]
        # llama-server's rule: longest common prefix, an image chunk is kept whole or not at all, and at
        # least one prompt token is evaluated (its logits give the first token)
        keep = 0
        limit = min(len(self.keys), len(keys) - 1)
        while keep < limit and self.keys[keep] == keys[keep]:
            keep += 1
        at, n_past, kept_tokens, encoded = 0, 0, 0, set()
        for idx, (chunk, ks) in enumerate(parts):
            image_chunk = bool(ks) and isinstance(ks[0], tuple)
            if at + len(ks) <= keep:  # whole chunk cached
                n_past += mtmd.mtmd_input_chunk_get_n_pos(chunk) if image_chunk else len(ks)
                at += len(ks)
                kept_tokens += len(ks)
                continue
            break
        else:
            idx = len(parts)
        head = 0
        if idx < len(parts) and not (parts[idx][1] and isinstance(parts[idx][1][0], tuple)):
            head = keep - at  # part of a text chunk is cached
            kept_tokens += head
        ll.llama_memory_seq_rm(self.mem, 0, n_past + head, -1)
        self.keys = keys[: at + head]
        pos = n_past + head
        for j in range(idx, len(parts)):
            chunk, ks = parts[j]
            last = j == len(parts) - 1
            if ks and isinstance(ks[0], tuple):
                new_past = ll.llama_pos(0)
                rc = mtmd.mtmd_helper_eval_chunk_single(self.mctx, self.ctx, chunk, pos, 0, self.n_batch, last,
                                                        ctypes.byref(new_past))
                if rc != 0:
                    raise SystemExit(f"mtmd_helper_eval_chunk_single failed ({rc})")
                pos = new_past.value
                encoded.add(ks[0][0])  # an image's tiles are chunks with the image's id
            else:
                tail = ks[head:] if j == idx else ks
                self._decode(tail, pos)
                pos += len(tail)
            self.keys += ks[head:] if j == idx else ks
        token = self._argmax()
        ttft_ms = (time.perf_counter() - t0) * 1000
        generated = [token]
        for _ in range(n_gen - 1):
            self._decode([token], pos)
            self.keys.append(token)
            pos += 1
            token = self._argmax()
            generated.append(token)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bmp)
        return {"ttft_ms": ttft_ms, "prompt_tokens": len(keys), "cached_tokens": kept_tokens,
                "images_encoded": len(encoded), "answer": self.detokenize(generated)}


def run_llamacpp_turns(ll, mtmd, model, mctx, cfg: dict, image: str, image_tokens: int, summary) -> dict:
    from ocula.gguf import GGUFFile

    projector = GGUFFile(cfg["mmproj"]).get("clip.projector_type") or ""
    n_ctx = ((image_tokens + 512 + 255) // 256) * 256
    runner = LlamaTurns(ll, mtmd, model, mctx, projector, n_ctx, cfg["threads"])
    first, second, details = [], [], []
    try:
        for _ in range(cfg["chat_reps"]):
            runner.reset()
            t1 = runner.turn(image, _messages(image, None), ANSWER_TOKENS)
            t2 = runner.turn(image, _messages(image, t1["answer"]), 1)
            first.append(t1["ttft_ms"])
            second.append(t2["ttft_ms"])
            details.append({"image": image, "prompt_tokens": [t1["prompt_tokens"], t2["prompt_tokens"]],
                            "cached_tokens": [t1["cached_tokens"], t2["cached_tokens"]],
                            "images_encoded": [t1["images_encoded"], t2["images_encoded"]], "answer": t1["answer"]})
    finally:
        runner.close()
    return turn_summary(first, second, details, summary)
