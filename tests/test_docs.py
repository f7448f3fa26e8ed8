"""The docs agree with themselves and with the code (issue 17, "Docs that agree with themselves"):
README's CLI synopsis lists every flag argparse knows, its status line carries the newest
measured rows of BENCHMARKS.md, every picture in docs/ can be rebuilt from the JSONs beside it,
and no doc speaks of how the work was organised rather than of ggfuse."""
from __future__ import annotations

import argparse
import os
import re
import sys

import pytest

from ggfuse.compiler import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def docs() -> list[str]:
    out = ["README.md", "BENCHMARKS.md", "tools/README.md", "tests/fixtures/README.md"]
    out += [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]
    return [p for p in out if os.path.exists(os.path.join(ROOT, p))]


def synopsis() -> str:
    s = read("README.md")
    return s[s.index("## The command line"):s.index("- `compile` writes the plan")]


def test_readme_synopsis_lists_every_flag():
    ap = cli.build_parser()
    text = synopsis()
    missing = []
    parsers = [("ggfuse", ap)] + list(ap._subparsers._group_actions[0].choices.items())
    for name, p in parsers:
        if name != "ggfuse" and f"ggfuse {name}" not in text:
            missing.append(f"ggfuse {name}")
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            for flag in a.option_strings:
                if not re.search(re.escape(flag) + r"(?![\w-])", text):
                    missing.append(f"{name} {flag}")
    assert not missing, "README synopsis lacks: " + ", ".join(sorted(set(missing)))


def _newest_benchmark():
    """(GPU, date, commit, [after tok/s ...]) of BENCHMARKS.md's first measured section."""
    b = read("BENCHMARKS.md")
    head = re.search(r"^## (\S+): .*\(same run, (\d{4}-\d{2}-\d{2})\)$", b, re.M)
    assert head, "BENCHMARKS.md: the first section names its GPU and date"
    body = b[head.end():b.index("\n## ", head.end())]
    commit = re.search(r"after it\s+\(([0-9a-f]{7,})\)", body).group(1)
    rows = re.findall(r"^\|[^|\n]*\| \d+ \| [\d,]+ \| ([\d,]+) \|", body, re.M)
    assert rows, "BENCHMARKS.md: the first section has a table of after tok/s"
    return head.group(1), head.group(2), commit, rows


def test_readme_status_matches_the_newest_benchmark_rows():
    gpu, date, commit, rows = _newest_benchmark()
    r = read("README.md")
    status = r[r.index("## Status"):]
    assert f"## Status ({date})" in r
    first = status.index("\n- ")
    line = status[first:status.index("\n- ", first + 3)]
    for want in (gpu, date, commit, *rows):
        assert want in line, f"README status line lacks {want!r} from BENCHMARKS.md"


def test_readme_llama_ratios_match_the_presets_table():
    b = read("BENCHMARKS.md")
    sec = b[b.index("## Whole model, every preset"):]
    sec = sec[:sec.index("![")]
    by_prompt: dict = {}
    for prompt, ratio in re.findall(r"^\|[^|]*\| (\d+) \|.*\*\*([\d.]+)x\*\* \|$", sec, re.M):
        by_prompt.setdefault(prompt, []).append(float(ratio))
    r = read("README.md")
    for prompt, rs in by_prompt.items():
        span = f"{min(rs):.2f}".rstrip("0").rstrip(".") + "-" + f"{max(rs):.2f}".rstrip("0").rstrip(".") + "x"
        assert re.search(re.escape(span).replace("x", "x?") + r" at " + prompt, r), (prompt, span)


PROCESS_WORDS = re.compile(r"\b(sessions?|device calls?|lent|lend|helpers?|engineers?|sub-?agents?|the lead|"
                           r"brief|worktree|budget_left|device time|carried back)\b", re.I)


@pytest.mark.parametrize("path", docs())
def test_docs_do_not_speak_of_how_the_work_is_organised(path):
    hits = [f"{path}:{i}: {line.strip()[:100]}" for i, line in enumerate(read(path).splitlines(), 1)
            if PROCESS_WORDS.search(line)]
    assert not hits, "\n".join(hits)


def test_doc_file_names_do_not_either():
    bad = [f for f in os.listdir(os.path.join(ROOT, "docs")) if PROCESS_WORDS.search(f.replace("-", " "))]
    assert not bad, bad


def test_every_picture_can_be_rebuilt_from_its_jsons(tmp_path):
    import rebuild_plots
    assert not rebuild_plots.problems()
    pytest.importorskip("matplotlib")
    assert rebuild_plots.main(["--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(rebuild_plots.PLOTS)
