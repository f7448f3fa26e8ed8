"""Every Python package directory of the repo is listed in pyproject.toml (a non-editable
install would silently drop one that is not)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"tests", ".git", ".ci", "build", "dist"}


def test_every_package_is_listed():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    listed = set(re.findall(r'"(ggfuse(?:\.[a-z_0-9]+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = {"ggfuse"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP and not d.startswith(".") and "egg-info" not in d
                       and d != "__pycache__"]
        rel = os.path.relpath(dirpath, ROOT)
        if rel != "." and "__init__.py" in filenames:
            found.add("ggfuse." + rel.replace(os.sep, "."))
    assert found - listed == set(), f"add to pyproject packages: {sorted(found - listed)}"
