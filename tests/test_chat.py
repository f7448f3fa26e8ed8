"""Chat templates: rendered as transformers' apply_chat_template renders them (references made by
tests/fixtures/make_text_fixtures.py for llama.cpp's copies of the models' templates), in a sandbox."""
import json
import os

import pytest

from ggfuse.runtime.chat import ChatTemplate, ChatTemplateError
from ggfuse.runtime.tokenizer import Tokenizer
from util import FIXTURES, fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(FIXTURES, "text", "chat_refs.json")) as _f:
    REFS = json.load(_f)
CASES = [(name, i) for name, ref in REFS.items() if not name.startswith("_") for i in range(len(ref["cases"]))]


def template(name):
    with open(os.path.join(ROOT, REFS[name]["dir"], name), encoding="utf-8") as f:
        return ChatTemplate(f.read(), REFS[name]["special_tokens"], source=name)


@pytest.mark.parametrize("name, i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_render_matches_transformers(name, i):
    case = REFS[name]["cases"][i]
    t = template(name)
    args = dict(add_generation_prompt=case["add_generation_prompt"], tools=case.get("tools"), **case.get("kwargs", {}))
    if "error" in case:
        with pytest.raises(ChatTemplateError) as e:
            t.render(case["messages"], **args)
        assert "\n" not in str(e.value)
    else:
        assert t.render(case["messages"], **args) == case["expected"]


def test_references_cover_the_supported_families():
    names = {n for n, _ in CASES}
    assert {"Qwen3.5-4B.jinja", "Qwen-Qwen3-0.6B.jinja", "google-gemma-4-31B-it.jinja"} <= names
    assert sum("expected" in REFS[n]["cases"][i] for n, i in CASES) >= 20


@pytest.mark.parametrize("source, words", [
    ("{{ ''.__class__.__mro__ }}", ["__class__"]),
    ("{% set x = messages.append(1) %}", ["append"]),
    ("{% set ns = namespace(_x=1) %}", ["_x"]),
    ("{{ raise_exception('no system role here') }}", ["no system role here"]),
    ("{% for m in messages %}{{ m.content.split() }}", ["does not compile"]),
    ("{{ messages[0]['content'] + 1 }}", ["TypeError"]),
])
def test_sandbox_and_errors_are_one_line(source, words):
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source, source="m.gguf").render([{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert msg.startswith("m.gguf: ") and "\n" not in msg and all(w in msg for w in words), msg


def test_helpers_and_variables():
    t = ChatTemplate("{{ bos_token }}{{ strftime_now('%Y') | length }}{{ {'a': '<&>'} | tojson }}"
                     "{% generation %}{{ messages[0].content }}{% endgeneration %}{{ extra }}",
                     {"bos_token": "<s>"})
    assert t.render([{"role": "user", "content": "x", "name": None}], extra="!") == '<s>4{"a": "<&>"}x!'
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        t.render("hello")


def test_from_tokenizer_uses_the_gguf_template_and_tokens():
    tok = Tokenizer.from_gguf(os.path.join(FIXTURES, "text", "ggml-vocab-gemma-4-pruned.gguf"))
    t = ChatTemplate.from_tokenizer(tok)
    assert t.special_tokens["bos_token"] == "<bos>" and t.special_tokens["eos_token"] == "<eos>"
    assert t.render([{"role": "user", "content": "Hi"}]).startswith("<bos><|turn>user\nHi<turn|>\n<|turn>model\n")
    no_template = Tokenizer.from_gguf(fixture("qwen35moe"))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.from_tokenizer(no_template)
