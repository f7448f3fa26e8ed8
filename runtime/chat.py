"""Chat templates: a GGUF's `tokenizer.chat_template` (Jinja) rendered the way Hugging Face
transformers' `apply_chat_template` renders it, in jinja2's immutable sandbox.

A template is code that came with a model file, so it runs sandboxed: no attribute access to
Python internals, no mutation of the objects it is given, namespaces that refuse underscore
names. What the template sees is what transformers gives it: `messages` (dicts, None-valued keys
dropped), `add_generation_prompt`, `tools`, `documents`, the special tokens as text
(`bos_token`, `eos_token`, ...), any extra keyword (e.g. `enable_thinking=False`), and the helpers
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, `dict` and `namespace`;
`{% generation %}` blocks render their body.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from ggfuse.errors import GGFuseError

__all__ = ["ChatTemplate", "ChatTemplateError"]


class ChatTemplateError(GGFuseError):
    """The chat template is missing, does not compile, or raised while rendering."""


# The special-token names transformers passes to a template (SPECIAL_TOKENS_ATTRIBUTES), and the
# tokenizer.ggml.*_token_id key that holds each one in a GGUF.
_SPECIAL_TOKEN_ROLES = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unk", "sep_token": "sep",
                        "pad_token": "padding", "mask_token": "mask"}


@lru_cache(maxsize=16)
def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %} (to find
        # the tokens to train on); rendering only needs the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # underscore names are how a template would reach Python internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=Dict(), namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _plain(value):
    """The template sees plain JSON-like data only (no objects with methods of their own)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with.

    render(messages, add_generation_prompt=True, tools=None, documents=None, **kwargs) -> str
    """

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None, source: str | None = None):
        import jinja2
        self.source = source
        self.text = template
        self.special_tokens = dict(special_tokens or {})
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(source, f"tokenizer.chat_template does not compile: {e.message} "
                                            f"(template line {e.lineno})") from None

    @classmethod
    def from_tokenizer(cls, tokenizer, template: str | None = None) -> ChatTemplate:
        """The tokenizer's own template (tokenizer.chat_template in its GGUF), or `template`."""
        template = template if template is not None else tokenizer.chat_template
        if template is None:
            raise ChatTemplateError(tokenizer.source, "the GGUF has no chat template (tokenizer.chat_template); "
                                                      "give the prompt as plain text instead")
        specials = {name: tokenizer.tokens[tokenizer.special_ids[role]] for name, role in _SPECIAL_TOKEN_ROLES.items()
                    if tokenizer.special_ids.get(role) is not None}
        return cls(template, specials, source=tokenizer.source)

    def render(self, messages, add_generation_prompt: bool = True, tools=None, documents=None, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), as transformers'
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...) gives it."""
        import jinja2
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError(self.source, "messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        # transformers drops None-valued keys (APIs send content=None) and copies the reasoning
        # under the names templates read
        chat = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        variables = _plain({**self.special_tokens, **kwargs})
        try:
            return self._compiled.render(messages=_plain(chat), tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(self.source, f"chat template: {e.message or type(e).__name__}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # a template that does not fit the messages it was given (e.g. content as a list)
            raise ChatTemplateError(self.source, f"chat template failed on these messages: "
                                                 f"{type(e).__name__}: {e}") from None
