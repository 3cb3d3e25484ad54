"""llama-server's `"verbose": true` request field: the answer gains `__verbose` with the prompt as the model
read it (its tokens detokenized, special tokens included) -- to check what a chat template made of a request."""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse


def capture_prompt(greq) -> dict:
    """Wrap the request's prompt builder so that the built Prompt is kept in the returned dict."""
    holder: dict = {}
    build = greq.build_prompt

    def build_and_keep(timings):
        prompt = build(timings)
        holder["prompt"] = prompt
        return prompt

    greq.build_prompt = build_and_keep
    return holder


def add_verbose(response, holder: dict, tokenizer):
    """The JSON answer with `__verbose: {prompt, prompt_tokens}` added (a stream or an error stays as it is)."""
    if not isinstance(response, JSONResponse) or response.status_code != 200 or "prompt" not in holder:
        return response
    body = json.loads(response.body)
    ids = list(holder["prompt"].token_ids)
    try:
        text = tokenizer.decode(ids)
    except (ValueError, IndexError, KeyError):  # e.g. image placeholder ids outside the vocabulary
        text = None
    body["__verbose"] = {"prompt": text, "prompt_tokens": ids}
    return JSONResponse(body, status_code=200, headers={k: v for k, v in response.headers.items()
                                                        if k.lower() not in ("content-length", "content-type")})
