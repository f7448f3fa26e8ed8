"""`ggfuse run -p/-f/--chat` and `ggfuse tokenize`: text out, a timing line, one-line errors."""
import os
import re
import subprocess
import sys

import pytest

import ggfuse
from ggfuse.compiler import cli
from util import fixture

TIMING = re.compile(r"^prompt (\d+) tokens, TTFT [\d.]+ ms, prefill [\d.]+ tok/s, decode [\d.]+ tok/s "
                    r"\((\d+) tokens, stopped: (\w+)\)$")


def run_cli(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", "ggfuse.compiler.cli", *map(str, args)], input=stdin,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def as_read(text: str) -> str:
    """What a text-mode pipe gives back for `text` (universal newlines)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture(scope="module")
def tiny():
    return ggfuse.load(fixture("qwen35moe"), device="cpu")


def test_run_prints_the_continuation_and_a_timing_line(tiny):
    code, out, err = run_cli("run", fixture("qwen35moe"), "-p", "Once upon", "-n", "12", "--temp", "0",
                             "--device", "cpu")
    assert code == 0, err
    want = tiny.tokenizer.decode(tiny.generate("Once upon", 12))
    assert out == as_read("Once upon" + want + "\n")
    m = TIMING.match(err.strip().splitlines()[-1])
    assert m and m.groups() == (str(len(tiny.tokenizer.encode("Once upon", parse_special=True))), "12", "length"), err


def test_run_sampling_flags_and_file(tiny, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Hello there", encoding="utf-8")
    args = ["--temp", "0.7", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.1",
            "--seed", "3", "-n", "10", "--device", "cpu", "--no-display-prompt"]
    code, out, err = run_cli("run", fixture("qwen35moe"), "-f", f, *args)
    assert code == 0, err
    ids = tiny.generate("Hello there", 10, temperature=0.7, top_k=20, top_p=0.9, min_p=0.1, repeat_penalty=1.1, seed=3)
    assert out == as_read(tiny.tokenizer.decode(ids) + "\n")
    code2, out2, _ = run_cli("run", fixture("qwen35moe"), "-f", f, *args)
    assert out2 == out


def test_run_with_no_arguments_prints_text_from_the_example():
    code, out, err = run_cli("run", "-n", "8", "--device", "cpu")
    assert code == 0, err
    assert "example model" in err and out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")
    assert TIMING.match(err.strip().splitlines()[-1])


def test_run_tokens_keeps_the_top5_mode():
    code, out, err = run_cli("run", fixture("qwen35moe"), "--tokens", "1,2,3", "--device", "cpu")
    assert code == 0 and "top-5 next tokens" in out


def test_chat_reads_turns_from_stdin():
    code, out, err = run_cli("run", cli.EXAMPLE_MODEL, "--chat", "-n", "6", "--temp", "0", "--device", "cpu",
                             stdin="Hello\n\nHow are you?\n")
    assert code == 0, err
    timings = [TIMING.match(line) for line in err.strip().splitlines() if line.startswith("prompt ")]
    assert len(timings) == 2 and all(timings)
    # the same conversation in-process (test_generate.py checks ChatSession itself)
    from ggfuse.runtime.generate import ChatSession
    chat = ChatSession(ggfuse.load(cli.EXAMPLE_MODEL, device="cpu"))
    want, n_prompt = [], []
    for turn in ("Hello", "How are you?"):
        want.append("".join(chat.reply(turn, 6, temperature=0)))
        n_prompt.append(chat.last.stats.n_prompt)
    assert out == as_read("".join(w + "\n" for w in want))
    assert [int(t.group(1)) for t in timings] == n_prompt and n_prompt[1] > n_prompt[0]


@pytest.mark.parametrize("args, words", [
    (["--temp", "x"], "--temp must be a number, got 'x'"),
    (["--temp", "-1"], "--temp must be >= 0"),
    (["--top-k", "1.5"], "--top-k must be an integer"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--min-p", "1"], "--min-p must be in [0, 1)"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be > 0"),
    (["--repeat-last-n", "-1"], "--repeat-last-n must be >= 0"),
    (["--seed", "abc"], "--seed must be an integer"),
    (["-n", "x"], "-n must be an integer"),
    (["-n", "-2"], "-n must be >= 0, or -1"),
    (["--logits", "x.npy"], "--logits needs --tokens"),
    (["-p", "a", "-f", "b.txt"], "-p or -f, not both"),
    (["-f", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt: no such file"),
    (["-n", "5000"], "do not fit the context of 4096 tokens"),
    (["--chat", "--chat-template", "/nonexistent.jinja"], "/nonexistent.jinja: no such file (the chat template)"),
])
def test_bad_flag_values_are_one_line_exit_2(args, words):
    code, out, err = run_cli("run", fixture("qwen35moe"), "--device", "cpu", *args, stdin="")
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("no model given")]
    assert len(lines) == 1 and lines[0].startswith("ggfuse: error: ") and words in lines[0], err
    assert "Traceback" not in err


def test_chat_without_template_is_one_line():
    code, out, err = run_cli("run", fixture("qwen35moe"), "--chat", "--device", "cpu", stdin="hi\n")
    assert code == 2 and err.strip().count("\n") == 0 and "no chat template" in err


def test_tokenize_like_llama_tokenize(tiny):
    code, out, err = run_cli("tokenize", fixture("qwen35moe"), "Hello world<|im_end|>")
    assert code == 0, err
    ids = tiny.tokenizer.encode("Hello world<|im_end|>", add_special=False)
    lines = out.splitlines()
    assert len(lines) == len(ids) and lines[0] == f"{ids[0]:6d} -> 'H'" and "->" in lines[-1]
    code, out, err = run_cli("tokenize", fixture("qwen35moe"), "Hello world<|im_end|>", "--ids", "--parse-special",
                             "--show-count")
    ids = tiny.tokenizer.encode("Hello world<|im_end|>", add_special=False, parse_special=True)
    assert out.splitlines() == [str(ids), f"Total number of tokens: {len(ids)}"]
    assert ids[-1] == tiny.tokenizer.token_to_id["<|im_end|>"]


def test_tokenize_vocab_only_file_with_bos_and_byte_pieces(tmp_path):
    vocab = os.path.join(os.path.dirname(__file__), "fixtures", "text", "ggml-vocab-gemma-4-pruned.gguf")
    code, out, err = run_cli("tokenize", vocab, "Hello world", "--ids")
    assert code == 0, err
    tok = ggfuse.Tokenizer.from_gguf(vocab)
    assert out.strip() == str(tok.encode("Hello world"))
    assert out.startswith(f"[{tok.bos_id}, ")
    code, out, err = run_cli("tokenize", vocab, "Hello world", "--ids", "--no-bos")
    assert out.strip() == str(tok.encode("Hello world", add_special=False))
    f = tmp_path / "t.txt"
    f.write_text("日本", encoding="utf-8")
    code, out, err = run_cli("tokenize", fixture("qwen35moe"), "-f", f)
    assert code == 0 and "(utf-8 decode failure)" in out


@pytest.mark.parametrize("args, words", [
    ([], "exactly one of TEXT, -f FILE or --stdin"),
    (["x", "--stdin"], "exactly one of"),
    (["-f", "/nonexistent.txt"], "no such file"),
])
def test_tokenize_errors(args, words):
    code, out, err = run_cli("tokenize", fixture("qwen35moe"), *args, stdin="")
    assert code == 2 and words in err and err.strip().count("\n") == 0, err


def test_tokenize_unsupported_vocab(tmp_path):
    import gguf
    p = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "a"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, out, err = run_cli("tokenize", p, "a")
    assert code == 2 and f"{p}: tokenizer model 'llama' (tokenizer.ggml.model) is not supported" in err
