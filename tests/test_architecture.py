"""The README's architecture picture is the code's, and imports go one way down the stages."""

from __future__ import annotations

import ast
import re

import pytest

from tests.helpers import architecture
from tests.helpers.architecture import STAGES, module_imports, parse_module, picture, stage_imports, upward_imports
from tests.helpers.paths import REPO


def test_readme_picture_is_generated_from_the_code():
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- architecture:begin -->\n```text\n(.*?)```\n<!-- architecture:end -->", readme, re.S)
    assert found, "README.md lacks the architecture block; paste `python -m tests.helpers.architecture` into it"
    assert found.group(1) == picture(REPO), "README picture is stale: rerun `python -m tests.helpers.architecture`"


def test_imports_go_one_way_down_the_stages():
    graph = module_imports(REPO)
    assert len(graph) > 40 and any(m.startswith("gradcamo_dask.jobs.") for m in graph)
    assert upward_imports(graph) == []
    uses = stage_imports(graph)
    assert "io" in uses["segment"] and "engine" in uses["jobs"]  # the graph sees real edges


def test_an_upward_import_is_caught():
    graph = {"gradcamo_dask.engine.explain": {"gradcamo_dask.jobs.train"},
             "gradcamo_dask.arrays": {"gradcamo_dask.cells"},
             "gradcamo_dask.jobs.score": {"gradcamo_dask.engine.explain", "gradcamo_dask.errors"}}
    assert upward_imports(graph) == ["gradcamo_dask.arrays imports gradcamo_dask.cells",
                                     "gradcamo_dask.engine.explain imports gradcamo_dask.jobs.train"]
    assert STAGES[0] == "io" and STAGES[-1] == "cli"


def test_parse_survives_the_cpython_ast_race_but_not_a_lasting_error(monkeypatch, tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n")
    real, calls = ast.parse, []

    def flaky(text, *args, **kwargs):
        calls.append(text)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=1, after=2)")
        return real(text, *args, **kwargs)

    monkeypatch.setattr(architecture.ast, "parse", flaky)
    assert isinstance(parse_module(source), ast.Module) and len(calls) == 2

    def broken(text, *args, **kwargs):
        raise SystemError("always")

    monkeypatch.setattr(architecture.ast, "parse", broken)
    with pytest.raises(SystemError, match="always"):
        parse_module(source)
