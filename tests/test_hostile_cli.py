"""Hostile flags, API values and output paths (issue 17: "Flags and API values", "Outputs",
the CLI boundary): one line `ggfuse: error: ...`, exit 2, nothing half-written, no traceback
unless ggfuse itself is wrong."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

import ggfuse
from ggfuse import fileio
from ggfuse.compiler import cli
from ggfuse.compiler.driver import compile_gguf
from ggfuse.errors import GGFuseError
from ggfuse.options import Options

from util import fixture

GGUF = fixture("qwen35moe", "q4_k_m")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(capsys, *argv, words=""):
    code, out, err = run(capsys, *argv)
    lines = err.strip("\n").split("\n")
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("ggfuse: error: "), err
    assert words in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def model():
    return ggfuse.load(GGUF, device="cpu")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("plan") / "p.ggfuse.json")
    compile_gguf(GGUF, target="cpu").save(p)
    return p


# ---- flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["run", GGUF, "--tokens", "1", "--chunk", "0"], "--chunk"),
    (["run", GGUF, "--tokens", "1", "--chunk", "-5"], "--chunk"),
    (["run", GGUF, "--tokens", "1", "--chunk", "99999999999999999999"], "--chunk"),
    (["run", GGUF, "--tokens", "99999999999999999999"], "--tokens"),
    (["run", GGUF, "--tokens", "320"], "outside the vocabulary"),
    (["run", GGUF, "--tokens", "1,2.5"], "--tokens"),
    (["run", GGUF, "--tokens", "1,,2"], "--tokens"),
    (["run", GGUF, "--tokens", "-1"], "--tokens"),
    (["run", GGUF, "--tokens", "nan"], "--tokens"),
    (["run", GGUF, "--tokens", "1", "--max-context", "0"], "--max-context"),
    (["run", GGUF, "--tokens", "1", "--vram-budget", "nan"], "--vram-budget"),
    (["run", GGUF, "--tokens", "1", "--vram-budget", "-3GiB"], "--vram-budget"),
    (["bench", GGUF, "--prompt", "-5", "--device", "cpu"], "--prompt"),
    (["bench", GGUF, "--repeat", "0", "--device", "cpu"], "--repeat"),
    (["bench", GGUF, "--chunk", "0", "--device", "cpu"], "--chunk"),
    (["bench", GGUF, "--tg", "-1", "--device", "cpu"], "--tg"),
    (["compile", GGUF, "--chunk", "0"], "--chunk"),
    (["compile", GGUF, "--deltanet-chunk", "1e9"], "--deltanet-chunk"),
    (["run", GGUF, "-n", "x"], "-n"),
    (["compile", GGUF, "--no-such-flag"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flag_values(capsys, argv, words):
    one_line(capsys, *argv, "--device", "cpu", words=words) if argv[0] == "run" else one_line(capsys, *argv, words=words)


def test_chunk_zero_is_never_the_default():
    with pytest.raises(GGFuseError, match="chunk"):
        Options.make(chunk=0)


def test_bench_device_cuda_without_cupy(capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed")
    except ImportError:
        pass
    one_line(capsys, "bench", GGUF, "--device", "cuda", "--prompt", "8", words="--device cuda")


# ---- API values ----------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[2 ** 63], [None], [[1, 2], [3]], [1.0], [1.5], [True], ["1"], [-1], [320],
                                 np.array([[1, 2]]), np.array([1.0]), "12", 7, {1: 2}])
def test_prefill_refuses_bad_token_ids(model, ids):
    with pytest.raises(GGFuseError) as e:
        model.prefill(ids)
    assert "\n" not in str(e.value)


def test_prefill_accepts_numpy_and_python_ints(model):
    model.reset()
    a = model.prefill(np.array([1, 2, 3], dtype=np.int32))
    model.reset()
    b = model.prefill([1, np.int64(2), 3])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kw", [{"vram_budget": float("nan")}, {"vram_budget": -1}, {"chunk": 0},
                                {"chunk": 2 ** 63}, {"chunk": 1.5}, {"max_context": 0}, {"device": "tpu"},
                                {"bogus": 1}, {"vram_budget": "1e999GiB"}])
def test_load_refuses_bad_arguments(kw):
    with pytest.raises(GGFuseError):
        ggfuse.load(GGUF, **({"device": "cpu"} | kw))


@pytest.mark.parametrize("kw", [{"max_new_tokens": -1}, {"max_new_tokens": 1.5}, {"temperature": float("nan")},
                                {"top_k": -3}, {"reset": "yes"}, {"stop": [3]}])
def test_generate_refuses_bad_arguments(model, kw):
    args = {"max_new_tokens": 2} | kw
    with pytest.raises(GGFuseError):
        model.generate([1, 2], **args)


def test_generate_refuses_bad_prompt_ids(model):
    for bad in ([2 ** 63], [None], [1.0]):
        with pytest.raises(GGFuseError):
            model.generate(bad, max_new_tokens=1)


# ---- files the user names ------------------------------------------------------------------

def test_fifo_and_directory_models_are_refused_without_blocking(tmp_path, capsys):
    fifo = str(tmp_path / "m.gguf")
    os.mkfifo(fifo)
    for cmd in (["run", fifo, "--tokens", "1", "--device", "cpu"], ["compile", fifo], ["bench", fifo],
                ["tokenize", fifo, "hi"]):
        assert "FIFO" in one_line(capsys, *cmd, words=fifo)
    assert "directory" in one_line(capsys, "compile", str(tmp_path), words=str(tmp_path))
    with pytest.raises(GGFuseError, match="FIFO"):
        ggfuse.load(fifo, device="cpu")


def test_prompt_file_fifo(tmp_path, capsys):
    fifo = str(tmp_path / "prompt.txt")
    os.mkfifo(fifo)
    one_line(capsys, "run", GGUF, "-f", fifo, "--device", "cpu", words="FIFO")


def test_newline_in_a_file_name_stays_one_line(tmp_path, capsys):
    bad = str(tmp_path / "a\nb.gguf")
    line = one_line(capsys, "compile", bad, words="a\\nb.gguf")
    assert "\n" not in line
    assert str(GGFuseError(bad, "x")).count("\n") == 0


# ---- outputs -------------------------------------------------------------------------------

def test_compile_onto_its_model_is_refused(tmp_path, capsys):
    m = tmp_path / "m.gguf"
    m.write_bytes(open(GGUF, "rb").read())
    before = m.read_bytes()
    one_line(capsys, "compile", m, "-o", m, words="overwrite")
    assert m.read_bytes() == before


def test_output_never_clobbers_a_gguf(tmp_path, plan_file, capsys):
    m = tmp_path / "m.gguf"
    m.write_bytes(open(GGUF, "rb").read())
    one_line(capsys, "inspect", plan_file, "--dot", m, words="GGUF")
    assert m.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("where", ["missing", "dir"])
def test_output_into_missing_folder_or_onto_folder(tmp_path, capsys, where):
    out = tmp_path / "no" / "p.json" if where == "missing" else tmp_path
    one_line(capsys, "compile", GGUF, "-o", out, "--target", "cpu", words=str(out))
    assert not any(f.name.endswith(".tmp") for f in tmp_path.rglob("*"))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_nothing_and_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.json"
    out.write_text("old plan")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fileio.os, "fsync", no_space)
    line = one_line(capsys, "compile", GGUF, "-o", out, "--target", "cpu", words=str(out))
    assert "No space left" in line
    assert out.read_text() == "old plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_logits_need_npy_and_a_failed_write_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    one_line(capsys, "run", GGUF, "--tokens", "1", "--device", "cpu", "--logits", tmp_path / "noext", words=".npy")
    assert not (tmp_path / "noext.npy").exists() and not (tmp_path / "noext").exists()
    out = tmp_path / "l.npy"
    out.write_bytes(b"old")
    monkeypatch.setattr(np, "save", lambda f, a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    one_line(capsys, "run", GGUF, "--tokens", "1", "--device", "cpu", "--logits", out, words="I/O error")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["l.npy"]


def test_dot_failure_keeps_the_old_file(tmp_path, plan_file, capsys, monkeypatch):
    out = tmp_path / "g.dot"
    out.write_text("old")
    import ggfuse.ir.printer as printer
    monkeypatch.setattr(printer, "to_dot", lambda g, weights=False: (_ for _ in ()).throw(GGFuseError(None, "boom")))
    one_line(capsys, "inspect", plan_file, "--dot", out, words="boom")
    assert out.read_text() == "old"


def test_two_writers_never_share_a_temp_name(tmp_path):
    target = tmp_path / "p.json"
    with fileio.atomic_output(target, "w") as a, fileio.atomic_output(target, "w") as b:
        assert a.name != b.name
        a.write("a")
        b.write("b")
    assert target.read_text() in ("a", "b")
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_an_exception_while_writing_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with fileio.atomic_output(target, "w") as f:
            f.write("half")
            raise RuntimeError("caller failed")
    assert list(tmp_path.iterdir()) == []


def test_bench_outputs_are_checked_before_the_run(tmp_path, capsys):
    one_line(capsys, "bench", GGUF, "--device", "cpu", "--json", tmp_path / "no" / "b.json", words="does not exist")


# ---- the CLI boundary ----------------------------------------------------------------------

def test_debug_anywhere():
    with pytest.raises(GGFuseError):
        cli.main(["run", GGUF, "--tokens", "1", "--chunk", "0", "--debug"])
    with pytest.raises(GGFuseError):
        cli.main(["--debug", "run", GGUF, "--tokens", "1", "--chunk", "0"])


def test_version_flag():
    p = subprocess.run([sys.executable, "-m", "ggfuse.compiler.cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("ggfuse ")


def test_a_bug_shows_a_traceback_and_asks_for_a_report(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a ggfuse bug")
    monkeypatch.setattr(cli, "cmd_inspect", broken)
    code, out, err = run(capsys, "inspect", "x")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err and "please report it" in err


def test_oserror_is_one_line(capsys, monkeypatch, plan_file):
    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")
    monkeypatch.setattr(cli, "cmd_inspect", denied)
    assert "/some/file: Permission denied" in one_line(capsys, "inspect", plan_file)


def test_sizes_are_binary():
    assert fileio.format_bytes(1536) == "1.5 KiB"
    assert fileio.format_bytes(12 * 2 ** 30) == "12.0 GiB"
    assert cli._human(2 ** 20) == "1.0 MiB"


def test_device_auto_says_once_that_it_falls_back(capsys, monkeypatch):
    from ggfuse.runtime import api
    monkeypatch.setattr(api, "cuda_available", lambda: False)
    monkeypatch.setattr(api, "_SAID_CPU_FALLBACK", [])
    monkeypatch.delenv("GGFUSE_QUIET", raising=False)
    ggfuse.load(GGUF)
    ggfuse.load(GGUF)
    err = capsys.readouterr().err
    assert err.count("cpu reference") == 1 and "slow" in err


def test_long_cpu_prefill_shows_progress(capsys):
    code, out, err = run(capsys, "run", GGUF, "--tokens", ",".join(["1"] * 40), "--device", "cpu", "--chunk", "16")
    assert code == 0 and "prefill 16/40 tokens" in err and "prefill 40/40 tokens" in err


def test_dot_export_is_deterministic(plan_file, tmp_path):
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"g{seed}.dot"
        subprocess.run([sys.executable, "-m", "ggfuse.compiler.cli", "inspect", plan_file, "--dot", str(out)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
        outs.append(out.read_text())
    assert outs[0] == outs[1]


def _all_parsers():
    ap = cli.build_parser()
    sub = ap._subparsers._group_actions[0]
    return [("ggfuse", ap)] + [(name, p) for name, p in sub.choices.items()]


def test_every_flag_has_help():
    import argparse
    missing = []
    for name, p in _all_parsers():
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def test_long_cpu_text_prompt_shows_progress(capsys):
    code, out, err = run(capsys, "run", fixture("qwen35", "q8_0"), "--device", "cpu", "--chunk", "16",
                         "-p", "hello world " * 12, "-n", "1")
    assert code == 0 and "prefill 16 tokens" in err
