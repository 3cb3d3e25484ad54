"""How `ocula run` / `ocula chat` treat the prompt: through a chat template, or as a plain completion.

A GGUF without `tokenizer.chat_template` is usually a base model (the Gemma 3 270M demo is one): wrapping its
prompt in some turn format makes it answer nonsense, so the CLI completes the prompt as is and says so once.
`--chat-template NAME|FILE|TEMPLATE` chats through a template anyway (also replacing the file's own); `--raw`
completes the prompt as is even when the file has a template.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ocula.text.builtin_templates import BUILTIN_TEMPLATES
from ocula.text.chat import GEMMA_TEMPLATE, ChatTemplate
from ocula.errors import OculaError


def add_template_args(p) -> None:
    p.add_argument("--raw", action="store_true", help="no chat template: complete the prompt as is")
    p.add_argument("--chat-template", metavar="NAME|FILE|TEMPLATE", default=None,
                   help="chat through this template: a built-in name (chatml, gemma, llama3, command-r), a Jinja file, or the template "
                        "text itself; replaces the GGUF's own. Without it a GGUF that carries no chat template "
                        "(a base model) completes the prompt as is")


def template_source(value: str) -> str:
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise OculaError(f"--chat-template {value!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
                         "a readable file, nor Jinja template text")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OculaError(f"--chat-template {value}: cannot read it: {e}") from None


def check_template_args(args) -> None:
    """Before the model loads: the flags agree and a --chat-template parses."""
    if args.raw and args.chat_template:
        raise OculaError("--raw and --chat-template contradict each other: pick one")
    if args.raw and (args.image or getattr(args, "video", None)):
        raise OculaError("--raw prompts cannot carry images or videos; drop --raw to use the chat template")
    if args.chat_template:
        ChatTemplate(template_source(args.chat_template))  # a TemplateError (an OculaError) if it does not parse


def choose_completion(args, model) -> bool:
    """True to complete prompts as is, False to chat through model.template (replaced by --chat-template).
    Says on stderr when a file without a template is run as a completion."""
    if args.chat_template:
        tok = model.tokenizer
        model.template = ChatTemplate(template_source(args.chat_template), tok.bos_token, tok.eos_token,
                                      model.architecture)
        return False
    if args.raw:
        return True
    if not model.template.is_fallback:
        return False
    name = model.gguf.path.name
    media = args.image or getattr(args, "video", None)
    if media or getattr(args, "system", None):
        print(f"ocula: {name} has no chat template; using {fallback_name(model.architecture)} for the "
              f"{'images or videos' if media else 'system message'} (--chat-template to choose another)", file=sys.stderr)
        return False
    print(f"ocula: {name} has no chat template (a base model?): completing the prompt as is "
          "(--chat-template chatml|gemma|FILE to chat through a template)", file=sys.stderr)
    return True


def fallback_name(architecture: str) -> str:
    return "Gemma's turn format" if ChatTemplate(None, architecture=architecture).source == GEMMA_TEMPLATE \
        else "ChatML"
