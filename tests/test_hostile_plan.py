"""Hostile plan files: every damaged, edited or odd plan is one line naming the file and the
field, exit 2; never a traceback, a hang or a blow-up (issue 17, "Plans")."""
from __future__ import annotations

import copy
import json
import os
import random
import sys

import pytest

from ggfuse.compiler import cli
from ggfuse.compiler.driver import compile_gguf
from ggfuse.compiler.plan import load_plan
from ggfuse.errors import PlanError

from util import fixture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    path = str(d / "base.ggfuse.json")
    compile_gguf(fixture("qwen35moe", "q4_k_m"), target="cpu").save(path)
    with open(path) as f:
        return path, json.load(f)


def one_line(capsys, argv, name):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ggfuse: error: "), err
    assert name in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def write(tmp_path, d, name="m.ggfuse.json", raw=None):
    p = str(tmp_path / name)
    with open(p, "w") as f:
        f.write(raw if raw is not None else json.dumps(d))
    return p


def first_step(d, op):
    return next(s for s in d["steps"] if s["op"] == op)


def edit_unknown_input(d):
    first_step(d, "rms_norm")["inputs"][0] = "%99999"


def edit_cycle(d):
    s = first_step(d, "rms_norm")
    later = max(x["id"] for x in d["steps"])
    s["inputs"][0] = f"%{later}"


def edit_self_cycle(d):
    s = first_step(d, "rms_norm")
    s["inputs"][0] = f"%{s['id']}"


def edit_attr_type(d):
    first_step(d, "rms_norm")["attrs"]["eps"] = "tiny"


def edit_attr_huge(d):
    first_step(d, "moe_route")["attrs"]["tile"] = 2 ** 40


def edit_op_type(d):
    first_step(d, "rms_norm")["op"] = 7


def edit_op_unknown(d):
    first_step(d, "rms_norm")["op"] = "frobnicate"


def edit_op_other(d):
    first_step(d, "rms_norm")["op"] = "softmax"


def edit_chunk0(d):
    d["chunk"] = 0


def edit_version_null(d):
    d["version"] = None


def edit_version_major(d):
    from ggfuse.compiler.plan import PLAN_VERSION
    d["version"] = [PLAN_VERSION[0] + 1, 0]


def edit_no_logits(d):
    del d["outputs"]["logits"]


def edit_no_steps(d):
    del d["steps"]


def edit_huge_number(d):
    d["hparams"]["n_vocab"] = 2 ** 80


def edit_negative_offset(d):
    d["weights"][0]["offset"] = -1


def edit_duplicate_id(d):
    d["steps"][5]["id"] = d["steps"][4]["id"]


def edit_bool_for_int(d):
    d["chunk"] = True


def edit_unknown_dim(d):
    first_step(d, "rms_norm")["outputs"][0]["shape"] = ["X", 256]


def edit_meta_sched(d):
    first_step(d, "rms_norm")["meta"] = {"sched_key": "soon"}


def edit_state_shape(d):
    s = next(x for x in d["steps"] if x["op"] == "input" and x["attrs"].get("kind") == "state")
    s["attrs"]["shape"] = [2 ** 41, 2 ** 41]
    s["outputs"][0]["shape"] = [2 ** 41, 2 ** 41]


def edit_options_type(d):
    d["options"]["chunk"] = "lots"


def edit_stats_type(d):
    d["stats"]["memory"] = "a lot"


def edit_lowering(d):
    d["graph_meta"]["lowering"] = {"target": 3}


@pytest.mark.parametrize("edit, field", [
    (edit_unknown_input, "inputs"), (edit_cycle, "cycle"), (edit_self_cycle, "cycle"),
    (edit_attr_type, "eps"), (edit_attr_huge, "tile"), (edit_op_type, "op"), (edit_op_unknown, "op"),
    (edit_op_other, "steps"), (edit_chunk0, "chunk"), (edit_version_null, "version"),
    (edit_version_major, "version"), (edit_no_logits, "logits"), (edit_no_steps, "steps"),
    (edit_huge_number, "n_vocab"), (edit_negative_offset, "offset"), (edit_duplicate_id, "id"),
    (edit_bool_for_int, "chunk"), (edit_unknown_dim, "'X'"), (edit_meta_sched, "sched_key"),
    (edit_state_shape, "shape"), (edit_options_type, "chunk"), (edit_stats_type, "memory"),
    (edit_lowering, "lowering"),
], ids=lambda x: x.__name__.replace("edit_", "") if callable(x) else None)
def test_edited_plan_is_one_line_naming_file_and_field(base, tmp_path, capsys, edit, field):
    path, d = base
    d = copy.deepcopy(d)
    edit(d)
    p = write(tmp_path, d)
    with pytest.raises(PlanError) as e:
        load_plan(p)
    assert "\n" not in str(e.value) and str(e.value).startswith(p) and field in str(e.value), str(e.value)
    for argv in (["inspect", p], ["run", p, "--tokens", "1,2", "--device", "cpu"]):
        one_line(capsys, argv, p)


@pytest.mark.parametrize("raw, words", [
    ("", "not valid JSON"), ("{", "not valid JSON"), ("[]", "not a ggfuse plan"),
    ('{"chunk": NaN}', "non-finite"), ('{"chunk": 1e999}', "out of range"),
    ('{"chunk": ' + "9" * 5000 + "}", "5000 digits"), ("[" * 100000 + "]" * 100000, "nested"),
    ('{"a":' * 50 + "1" + "}" * 50, "nested"),
])
def test_damaged_text(tmp_path, capsys, raw, words):
    p = write(tmp_path, None, raw=raw)
    line = one_line(capsys, ["inspect", p], p)
    assert words in line, line


def test_gguf_given_to_inspect_says_compile_first(capsys):
    line = one_line(capsys, ["inspect", fixture("qwen35moe", "q4_k_m")], "q4_k_m.gguf")
    assert "compile it first" in line


def test_fifo_and_directory_plans_are_refused_without_blocking(tmp_path, capsys):
    fifo = str(tmp_path / "p.ggfuse.json")
    os.mkfifo(fifo)
    assert "FIFO" in one_line(capsys, ["inspect", fifo], fifo)
    assert "FIFO" in one_line(capsys, ["run", fifo, "--tokens", "1", "--device", "cpu"], fifo)
    assert "directory" in one_line(capsys, ["inspect", str(tmp_path)], str(tmp_path))


@pytest.mark.parametrize("field, value", [("offset", 1), ("nbytes", 2), ("shape", None), ("ggml_type", None)])
def test_weights_table_is_checked_against_the_gguf(base, tmp_path, capsys, field, value):
    path, d = base
    d = copy.deepcopy(d)
    w = next(x for x in d["weights"] if x["ggml_type"] == "F32" and len(x["shape"]) == 1)
    if field == "offset":
        w["offset"] += 4
    elif field == "nbytes":
        w["nbytes"] *= 2
    elif field == "shape":
        w["shape"] = [w["shape"][0] // 2, 2]
    else:
        w["ggml_type"] = "F16"
        for s in d["steps"]:
            if s["op"] == "weight" and s["attrs"]["tensor"] == w["name"]:
                s["attrs"]["ggml_type"] = "F16"
    p = write(tmp_path, d)
    line = one_line(capsys, ["run", p, "--tokens", "1,2", "--device", "cpu"], p)
    assert "weights" in line and w["name"] in line, line


def test_plan_whose_gguf_is_gone(base, tmp_path, capsys):
    path, d = base
    d = copy.deepcopy(d)
    d["source"]["path"] = str(tmp_path / "gone.gguf")
    p = write(tmp_path, d)
    line = one_line(capsys, ["run", p, "--tokens", "1", "--device", "cpu"], p)
    assert "source.path" in line


def test_valid_plan_still_runs(base, capsys):
    path, _ = base
    assert cli.main(["run", path, "--tokens", "1,2,3", "--device", "cpu"]) == 0
    assert cli.main(["inspect", path, "--summary"]) == 0


def test_fuzz_sample(tmp_path):
    """A seeded sample of tools/fuzz_plan.py: plan and argument mutants, none a crash."""
    import fuzz_plan
    old = os.environ.get("GGFUSE_QUIET")
    os.environ["GGFUSE_QUIET"] = "1"
    try:
        import signal
        signal.signal(signal.SIGALRM, fuzz_plan._alarm)
        bases = fuzz_plan.make_bases(str(tmp_path))[:3]
        rng = random.Random(17)
        pc, pf = fuzz_plan.fuzz_plans(120, rng, bases, str(tmp_path), 30, 1 << 30, lambda m: None)
        ac, af = fuzz_plan.fuzz_args(40, rng, bases, str(tmp_path), 30, 1 << 30, lambda m: None)
    finally:
        if old is None:
            os.environ.pop("GGFUSE_QUIET", None)
        else:
            os.environ["GGFUSE_QUIET"] = old
    assert not pf and not af, (pf + af)[:3]
    assert sum(pc.values()) == 120 and sum(ac.values()) == 40
