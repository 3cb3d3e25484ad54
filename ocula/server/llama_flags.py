"""llama-server's command-line flags that `ocula serve` also takes, so that a llama-server command line (a
llama-swap entry, a launcher script) runs with `ocula serve` in its place. Imported by the CLI: keep it light.

`-b` / `--batch-size` sets the prompt tokens per prefill step (--prefill-chunk); `--chat-template`,
`--chat-template-file` and `--no-ui` are ocula serve's own flags too. Flags about llama-server's own
machinery (GPU offload, flash attention, slots endpoint, ...) have nothing to change here: they are
accepted and named in one note on stderr, never silently.
"""
from __future__ import annotations

import sys

from ocula.errors import OculaError

# llama-server switches with no meaning for ocula (no value)
NO_EFFECT_SWITCHES = ("--jinja", "--no-jinja", "--slots", "--no-slots", "--cont-batching", "--no-cont-batching",
                      "--metrics", "--embedding", "--embeddings", "--kv-unified",
                      "--swa-full", "--no-mmap", "--mlock", "--offline", "--context-shift", "--no-context-shift")
# ... and options with a value
NO_EFFECT_OPTIONS = (("-ngl", "--n-gpu-layers", "--gpu-layers"), ("-fa", "--flash-attn"),
                     ("-ub", "--ubatch-size"), ("-ctk", "--cache-type-k"), ("-ctv", "--cache-type-v"))


def add_llama_server_flags(p) -> None:
    g = p.add_argument_group("llama-server compatibility")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=int, default=None,
                   help="prompt tokens per prefill step (the same as --prefill-chunk)")
    for flag in NO_EFFECT_SWITCHES:
        g.add_argument(flag, dest=_dest(flag), action="store_true", help="accepted; no effect in ocula")
    for flags in NO_EFFECT_OPTIONS:
        g.add_argument(*flags, dest=_dest(flags[1]), default=None, metavar="V", help="accepted; no effect in ocula")


def _dest(flag: str) -> str:
    return "llama_" + flag.lstrip("-").replace("-", "_")


def apply_llama_server_flags(args, model) -> None:
    """Act on the flags that mean something here (after the model is loaded); note the others on stderr."""
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise OculaError("--batch-size must be >= 1")
        args.prefill_chunk = args.batch_size
    ignored = [f for f in NO_EFFECT_SWITCHES if getattr(args, _dest(f))]
    ignored += [fs[1] for fs in NO_EFFECT_OPTIONS if getattr(args, _dest(fs[1])) is not None]
    if ignored:
        print(f"ocula: note: llama-server flag(s) {' '.join(ignored)} have no effect in ocula", file=sys.stderr)
