"""llama-server's `POST /infill`: fill-in-the-middle for code editors (llama.vscode, llama.vim and the like).

The request has `input_prefix`, `input_suffix`, optional `input_extra` ([{"filename", "text"}] context chunks)
and `prompt` (text already typed after the prefix), plus /completion's generation options; the answer is
/completion's. The prompt is laid out with the model's FIM tokens, repository-level when the vocabulary has
the repo/file-separator tokens:

    [REPO]myproject\\n [SEP]<filename>\\n<text> ... [SEP]filename\\n [BOS] [PRE]<prefix><prompt> [SUF]<suffix> [MID]

(without separator tokens, extra chunks are joined by a plain-text snippet marker). FIM tokens come from the
GGUF (`tokenizer.ggml.fim_*_token_id`, or the older prefix/suffix/middle keys), else from their usual
spellings in the vocabulary. A model without them answers 501, as llama-server does. Nothing is cut to fit:
a prompt beyond the context is a 400.
"""
from __future__ import annotations

import time

from fastapi import Request

from ocula.engine.prompt import Prompt
from ocula.server.errors import APIError
from ocula.server.llama_routes import field, native
from ocula.server.native_completion import NativeFormat, Options, about_prompt, make_constraint, recorded

SPELLINGS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>", "<｜fim▁begin｜>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>", "<｜fim▁hole｜>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "▁<MID>", "<｜fim▁end｜>"),
    "rep": ("<|repo_name|>", "<repo_name>", "<reponame>"),
    "sep": ("<|file_sep|>", "<file_sep>"),
}
OLD_KEYS = {"pre": "prefix", "suf": "suffix", "mid": "middle"}
SNIPPET_MARKER = "\n\n--- snippet ---\n\n"


def fim_tokens(model) -> dict[str, int | None]:
    """The vocabulary's FIM token ids (None where it has none)."""
    out: dict[str, int | None] = {}
    for kind, spellings in SPELLINGS.items():
        tid = model.gguf.get(f"tokenizer.ggml.fim_{kind}_token_id")
        if tid is None and kind in OLD_KEYS:
            tid = model.gguf.get(f"tokenizer.ggml.{OLD_KEYS[kind]}_token_id")
        if tid is None:
            tid = next((t for t in (model.tokenizer.token_id(s) for s in spellings) if t is not None), None)
        out[kind] = int(tid) if tid is not None else None
    return out


def register(app, ctx) -> None:
    fim = fim_tokens(ctx.model)

    @native
    async def infill(request: Request):
        return await recorded(ctx, "infill", handle(request))

    async def handle(request: Request):
        t0 = time.perf_counter()
        ctx.check_auth(request)
        body = await ctx.read_json(request)
        prefix = field(body, "input_prefix", str, "")
        suffix = field(body, "input_suffix", str, "")
        typed = field(body, "prompt", str, "")
        extra = field(body, "input_extra", list, [])
        chunks = []
        for i, chunk in enumerate(extra):
            if not isinstance(chunk, dict):
                raise APIError(400, f"input_extra[{i}] must be {{\"filename\": ..., \"text\": ...}}",
                               param="input_extra", code="invalid_type")
            if "text" not in chunk:  # as llama-server: a chunk's text is required, its file name optional
                raise APIError(400, f"input_extra[{i}] has no \"text\": each chunk needs its text as a string",
                               param="input_extra", code="missing_required_parameter")
            chunks.append((field(chunk, "filename", str, "tmp", where=f"input_extra[{i}].filename"),
                           field(chunk, "text", str, "", where=f"input_extra[{i}].text")))
        # the request is checked first, so a bad one is a 400 whatever the model
        if fim["pre"] is None or fim["suf"] is None or fim["mid"] is None:
            raise APIError(501, f"model {ctx.model_id!r} has no fill-in-the-middle tokens (prefix, suffix, middle), "
                                "so /infill is not supported", type="not_supported_error", code="not_supported")
        chars = len(prefix) + len(suffix) + len(typed) + sum(len(t) + len(f) for f, t in chunks)
        if chars // ctx.model.tokenizer.max_token_bytes > ctx.sched.n_ctx:
            raise APIError(400, f"the infill text has {chars} characters, more tokens than the context holds "
                                f"({ctx.sched.n_ctx})", param="input_prefix", code="context_length_exceeded")
        options = Options(ctx, body)
        constraint = await make_constraint(ctx, options)
        seen: dict = {}

        def build(timings):
            p = Prompt.from_tokens(layout(ctx.model, fim, prefix, suffix, typed, chunks), ctx.model.text.cfg.is_mrope)
            seen["prompt"] = p
            return p

        from ocula.engine.scheduler import GenerationRequest

        greq = GenerationRequest(build, options.params, False, constraint,
                                 options.n_probs if options.n_probs > 0 else None, options.logit_bias,
                                 post_sampling_probs=options.post_sampling)
        stream = field(body, "stream", bool, False)
        try:
            return await ctx.run(request, greq, NativeFormat(ctx, options, 0, seen), stream, False, "infill", t0)
        except APIError as e:
            raise about_prompt(e) from None

    app.add_api_route("/infill", infill, methods=["POST"])


def layout(model, fim: dict, prefix: str, suffix: str, typed: str, chunks: list[tuple[str, str]]) -> list[int]:
    """The FIM prompt's token ids (runs on the scheduler thread)."""
    tok = model.tokenizer

    def text(s: str) -> list[int]:
        return tok.encode(s, add_special=False, parse_special=False)

    ids: list[int] = []
    if fim["rep"] is not None:
        ids += [fim["rep"]] + text("myproject\n")
    for filename, body in chunks:
        ids += [fim["sep"]] + text(filename + "\n") if fim["sep"] is not None else text(SNIPPET_MARKER)
        ids += text(body)
    if fim["sep"] is not None:
        ids += [fim["sep"]] + text("filename\n")
    if tok.add_bos and tok.bos_id is not None:
        ids.append(tok.bos_id)
    ids += [fim["pre"]] + text(prefix) + text(typed)
    ids += [fim["suf"]] + text(suffix)
    ids.append(fim["mid"])
    return ids
