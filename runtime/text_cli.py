"""The text side of the `ggfuse` command: `ggfuse run -p TEXT` / `--chat` (generation, streamed)
and `ggfuse tokenize` (like llama.cpp's llama-tokenize). compiler/cli.py wires them in.

Flag values are checked here and reported as one-line errors (exit 2), naming the flag.
"""
from __future__ import annotations

import os
import sys

from ggfuse.errors import GGFuseError

DEFAULT_PROMPT = "Once upon a time"

# (flag, SamplingParams / Generation keyword, type, default, help): llama-cli's defaults
SAMPLING_FLAGS = (
    ("--temp", "temperature", float, 0.8, "temperature (0: greedy)"),
    ("--top-k", "top_k", int, 40, "keep the K most likely tokens (0: all)"),
    ("--top-p", "top_p", float, 0.95, "keep the fewest tokens whose probability reaches X (1: off)"),
    ("--min-p", "min_p", float, 0.05, "keep tokens at least X times as likely as the best (0: off)"),
    ("--repeat-penalty", "repeat_penalty", float, 1.0, "penalise the tokens of the last --repeat-last-n (1: off)"),
    ("--repeat-last-n", "repeat_last_n", int, 64, "how many last tokens the repeat penalty looks at"),
)


def add_text_run_arguments(r) -> None:
    """The generation flags of `ggfuse run` (the --tokens mode keeps its own)."""
    r.add_argument("-p", "--prompt", help=f"the prompt text (default {DEFAULT_PROMPT!r}); with --chat: "
                                          f"the system message")
    r.add_argument("-f", "--file", help="read the prompt from this file (UTF-8)")
    r.add_argument("-n", "--n-predict", default="128", help="tokens to generate (default 128; -1: until the "
                                                           "context is full or the model ends its answer)")
    for flag, name, typ, default, text in SAMPLING_FLAGS:
        r.add_argument(flag, dest=name, default=None, metavar="N" if typ is int else "X",
                       help=f"{text}; default {default}")
    r.add_argument("--seed", default=None, help="random seed for sampling (default: a new one each run)")
    r.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable)")
    r.add_argument("--chat", action="store_true", help="chat: read user turns from stdin, one per line, apply "
                                                       "the model's chat template and keep the conversation")
    r.add_argument("--chat-template", metavar="FILE", help="with --chat: a Jinja chat template file to use "
                                                            "instead of the model's own")
    r.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt before the text")


def _parse(value, flag: str, typ):
    try:
        return typ(value)
    except (TypeError, ValueError):
        kind = "an integer" if typ is int else "a number"
        raise GGFuseError(None, f"{flag} must be {kind}, got {value!r}") from None


def sampling_kwargs(args) -> dict:
    """The Generation keywords from the flags, checked: GGFuseError names the flag."""
    from ggfuse.runtime.sampling import SamplingParams
    kw = {name: (default if getattr(args, name) is None else _parse(getattr(args, name), flag, typ))
          for flag, name, typ, default, _ in SAMPLING_FLAGS}
    kw["seed"] = None if args.seed is None else _parse(args.seed, "--seed", int)
    if kw["seed"] is not None and kw["seed"] < 0:
        kw["seed"] = None    # llama.cpp: -1 is "random"
    try:
        SamplingParams(**kw)
    except GGFuseError as e:
        flags = {name: flag for flag, name, *_ in SAMPLING_FLAGS} | {"seed": "--seed"}
        word, _, rest = e.message.partition(" ")
        raise GGFuseError(None, f"{flags.get(word, word)} {rest}") from None
    return kw


def _n_predict(args) -> int | None:
    n = _parse(args.n_predict, "-n", int)
    if n < -1:
        raise GGFuseError(None, f"-n must be >= 0, or -1 for no limit, got {n}")
    return None if n == -1 else n


def _prompt_text(args) -> str:
    if args.file is not None and args.prompt is not None:
        raise GGFuseError(None, "give the prompt with -p or -f, not both")
    if args.file is not None:
        return read_text(args.file, "-f file")
    return args.prompt if args.prompt is not None else DEFAULT_PROMPT


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file the user named (a prompt, a chat template): a regular file only (a FIFO
    would block), one line naming it on any failure."""
    from ggfuse.fileio import open_input
    try:
        with open_input(path, "rb", what=what) as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGFuseError(path, f"not UTF-8 text (byte {e.start}): the {what} must be a text file") from None
    except OSError as e:
        raise GGFuseError(path, f"cannot read the {what}: {e.strerror}") from None


def run_text(args, model) -> int:
    """`ggfuse run` without --tokens: stream the continuation of the prompt (or a chat), then
    one timing line on stderr."""
    kw = sampling_kwargs(args)
    n = _n_predict(args)
    if args.stop:
        kw["stop"] = args.stop
    if args.chat:
        return _chat(args, model, n, kw)
    text = _prompt_text(args)
    from ggfuse.options import quiet
    if model.device == "cpu" and not quiet():
        # the cpu reference is slow: a long prompt says how far its prefill is, chunk by chunk
        def on_chunk(n_past):
            if n_past % model.chunk == 0:
                print(f"prefill {n_past} tokens", file=sys.stderr, flush=True)
        kw["on_chunk"] = on_chunk
    gen = model.stream(text, n, **kw)    # tokenizes, checks the context before any output
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(text)
        out.flush()
    for piece in gen:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    print(gen.stats.line(), file=sys.stderr)
    return 0


def _chat(args, model, n, kw) -> int:
    from ggfuse.runtime.generate import ChatSession
    if args.file is not None:
        raise GGFuseError(None, "--chat reads the conversation from stdin; -f does not apply")
    template = None
    if args.chat_template is not None:
        template = read_text(args.chat_template, "chat template")
    chat = ChatSession(model, system=args.prompt, template=template)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        for piece in chat.reply(line, n, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(chat.last.stats.line(), file=sys.stderr)
    return 0


# ---- tokenize --------------------------------------------------------------------------------

def add_tokenize_parser(sub):
    t = sub.add_parser("tokenize", help="print the token ids of a text, as llama.cpp's llama-tokenize does",
                       description="Tokenize TEXT with MODEL's tokenizer (a model GGUF, a vocab-only GGUF or a "
                                   "plan). Prints 'id -> piece' per token, or the ids as a list with --ids.")
    t.add_argument("model", help="a model GGUF, a vocab-only GGUF or a plan")
    t.add_argument("text", nargs="?", help="the text (or -f FILE, or --stdin)")
    t.add_argument("-f", "--file", help="read the text from this file")
    t.add_argument("--stdin", action="store_true", help="read the text from stdin")
    t.add_argument("--ids", action="store_true", help="print only the ids, as [1, 2, 3]")
    t.add_argument("--no-bos", action="store_true", help="do not add BOS even where the model asks for it")
    t.add_argument("--parse-special", action="store_true", help="turn control tokens written in the text "
                                                                "(e.g. <|im_start|>) into their ids")
    t.add_argument("--show-count", action="store_true", help="also print the number of tokens")
    t.set_defaults(fn=tokenize_main)
    return t


def tokenizer_of(path: str):
    """The tokenizer of a GGUF, or of the GGUF a plan was compiled from."""
    from ggfuse.runtime.api import _is_plan
    from ggfuse.runtime.tokenizer import Tokenizer
    from ggfuse.fileio import check_input
    check_input(path, "model")
    if _is_plan(path):
        from ggfuse.compiler.plan import load_plan
        src = load_plan(path).source["path"]
        if not os.path.isabs(src) and not os.path.exists(src):
            src = os.path.join(os.path.dirname(os.path.abspath(path)), src)
        path = src
    return Tokenizer.from_gguf(path)


def tokenize_main(args) -> int:
    given = [x for x in (args.text is not None, args.file is not None, args.stdin) if x]
    if len(given) != 1:
        raise GGFuseError(None, "give exactly one of TEXT, -f FILE or --stdin")
    if args.file is not None:
        args.prompt = None
        text = _prompt_text(args)
    elif args.stdin:
        text = sys.stdin.read()
    else:
        text = args.text
    tok = tokenizer_of(args.model)
    # llama-tokenize: add_special only when the model adds a BOS (and --no-bos is not given)
    ids = tok.encode(text, add_special=tok.add_bos and not args.no_bos, parse_special=args.parse_special)
    if args.ids:
        print("[" + ", ".join(map(str, ids)) + "]")
    else:
        for i in ids:
            piece = tok.token_to_piece(i, special=True)
            try:
                shown, note = piece.decode("utf-8"), ""
            except UnicodeDecodeError:
                shown, note = piece.decode("utf-8", "replace"), " (utf-8 decode failure)"
            print(f"{i:6d} -> '{shown}'{note}")
    if args.show_count:
        print(f"Total number of tokens: {len(ids)}")
    return 0
