"""`ggfuse serve MODEL`: flags, checks, and the foreground server. compiler/cli.py wires it in.

Every flag value is checked before the model loads; a bad one is a one-line error (exit 2)."""
from __future__ import annotations

import logging
import os
import sys

from ggfuse.errors import GGFuseError

DEFAULT_CACHE_BUDGET = "4GiB"


def add_serve_parser(sub):
    from ggfuse.options import add_arguments
    s = sub.add_parser("serve", help="serve a model over HTTP with the OpenAI API (completions, chat), with a "
                                     "prompt-prefix cache")
    s.add_argument("model", help="GGUF or plan")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    s.add_argument("--port", default="8080", help="TCP port (default 8080; 0: any free one)")
    s.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--api-key-file", metavar="FILE", help="read the key from FILE (keeps it out of the process list)")
    s.add_argument("--cache-budget", default=DEFAULT_CACHE_BUDGET, metavar="B",
                   help=f"bytes of prompt-prefix snapshots to keep, e.g. 8GiB; 0 turns the cache off "
                        f"(default {DEFAULT_CACHE_BUDGET})")
    s.add_argument("--cache-memory", default="auto", metavar="{auto,device,host}",
                   help="where the snapshots live: device (GPU memory), host, or auto (device where the budget "
                        "takes at most half of the free GPU memory; the cpu device: host)")
    s.add_argument("--max-queue", default="16", metavar="N",
                   help="requests that may wait for the model besides the one it runs; more are answered 503 with "
                        "Retry-After (default 16)")
    s.add_argument("--max-body", default="4MiB", metavar="B", help="largest request body (default 4MiB)")
    s.add_argument("--model-name", metavar="NAME", help="the model's id in the API (default: the file name)")
    s.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file instead of the model's own")
    s.add_argument("--no-warmup", action="store_true", help="do not run each captured chunk size once at start")
    s.add_argument("--log-level", default="info", metavar="{debug,info,warning,error}",
                   help="log lines on stderr: one per request at info (default)")
    add_arguments(s)
    s.set_defaults(fn=cmd_serve)
    return s


def _int(value, flag: str, lo: int, hi: int) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise GGFuseError(None, f"{flag} must be an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise GGFuseError(None, f"{flag} must be in {lo}..{hi}, got {v}")
    return v


def cache_budget(value) -> int:
    from ggfuse.options import parse_bytes
    if str(value).strip() in ("0", "0B", "0b"):
        return 0
    return parse_bytes(value, "--cache-budget")


def model_name(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    for ext in (".ggfuse.json", ".json", ".gguf"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def settings_from_args(args):
    """(ServeSettings, cache budget, cache memory, chat template text or None, log level), checked."""
    from ggfuse.options import parse_bytes
    from ggfuse.runtime.serve.app import ServeSettings
    key = args.api_key
    if args.api_key_file is not None:
        if key is not None:
            raise GGFuseError(None, "give --api-key or --api-key-file, not both")
        from ggfuse.runtime.text_cli import read_text
        key = read_text(args.api_key_file, "API key file").strip()
    if key is not None and (not key or any(c.isspace() for c in key) or not key.isprintable()):
        raise GGFuseError(None, "the API key must be non-empty printable text without spaces")
    memory = str(args.cache_memory).strip().lower()
    if memory not in ("auto", "device", "host"):
        raise GGFuseError(None, f"--cache-memory must be auto, device or host, not {args.cache_memory!r}")
    level = str(args.log_level).strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise GGFuseError(None, f"--log-level must be debug, info, warning or error, not {args.log_level!r}")
    template = None
    if args.chat_template is not None:
        from ggfuse.runtime.text_cli import read_text
        template = read_text(args.chat_template, "chat template")
    max_context = None if args.max_context is None else _int(args.max_context, "--max-context", 2, 1 << 30)
    s = ServeSettings(host=str(args.host), port=_int(args.port, "--port", 0, 65535), api_key=key,
                      model_name=args.model_name or model_name(args.model),
                      max_queue=_int(args.max_queue, "--max-queue", 1, 1 << 20),
                      max_body_bytes=parse_bytes(args.max_body, "--max-body"), max_context=max_context)
    return s, cache_budget(args.cache_budget), memory, template, level


# A chat turn that resumes from the prefix cache prefills its new messages, then (after the
# snapshot where the messages end) the few tokens of the answer's prompt: on CUDA that tail runs
# the smallest captured chunk size, so the server captures down to 16 tokens instead of the
# compile default (256, about 40 ms of a 35B-A3B prefill for 3 tokens on an H200).
SERVE_SUB_CHUNK_MIN = 16


def serve_options(args):
    """The model options of `ggfuse serve`: the flags given, the server's own defaults for the
    others (SERVE_SUB_CHUNK_MIN), then Options' defaults."""
    from ggfuse.options import from_args
    if getattr(args, "sub_chunk_min", None) is None:
        args.sub_chunk_min = SERVE_SUB_CHUNK_MIN
    return from_args(args)


def cmd_serve(args) -> int:
    import ggfuse
    from ggfuse.runtime.serve import Server, make_cache, require_stack, warm_up
    settings, budget, memory, template, level = settings_from_args(args)
    options = serve_options(args)   # bad option values fail before the model loads
    require_stack()
    from ggfuse.fileio import check_input
    check_input(args.model, "model")
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    m = ggfuse.load(args.model, options=options)
    m.tokenizer      # GGFuseError now, not at the first request, when the GGUF has none
    if not args.no_warmup:
        warm_up(m)
    cache = make_cache(m, budget, memory)
    srv = Server(m, settings, cache=cache, chat_template=template, log_level="warning" if level != "debug" else "info")
    where = f"prefix cache {budget / 2**30:.2f} GiB in {cache.where} memory" if cache else "no prefix cache"
    print(f"ggfuse serve: {settings.model_name} ({m.arch} on {m.device}, context {srv.context}, {where}) at "
          f"{srv.url}/v1{' (API key required)' if settings.api_key else ''}", file=sys.stderr, flush=True)
    try:
        srv.run()
    except KeyboardInterrupt:
        pass
    return 0
