"""The bad-input corpus: one small generated case per class of bad input, all through the CLI.

Each case builds its inputs in its own folder (copies of one tiny plate and bundle,
changed as the class needs), runs ``gradcamo_dask.cli.main`` in-process and checks:
exit status 1, the error type printed, the culprit (file, option, value) named, and
that nothing outside the intended output changed (every input folder hashed before
and after). Add a case here whenever a new class of bad input is found.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gradcamo_dask import cli
from tests.corpus.cases import CASES, Case
from tests.helpers.plate_fixtures import make_bundle, make_plate
from tests.helpers.tree_digest import tree_digest


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """One tiny plate (labels inside) and bundle that every case copies or reads."""
    root = tmp_path_factory.mktemp("corpus-base")
    return {"root": root, "plate": make_plate(root / "plate.zarr"), "bundle": make_bundle(root / "bundle")}


@pytest.fixture(scope="module")
def scheduler():
    """A one-worker cluster for the cases that must score before they fail."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_by_name_and_changes_nothing(name, base, tmp_path, capsys, request):
    build = CASES[name]
    work = tmp_path / "case"
    work.mkdir()
    for key in ("plate", "bundle"):
        shutil.copytree(base[key], work / base[key].name, symlinks=True)
    paths = {"root": work, "plate": work / "plate.zarr", "bundle": work / "bundle"}
    if getattr(build, "needs_scheduler", False):
        paths["scheduler"] = request.getfixturevalue("scheduler")
    case: Case = build(paths)
    capsys.readouterr()
    skip = tuple(p for p in (case.out,) if p is not None)
    before = tree_digest(work, skip=skip)
    base_before = tree_digest(base["root"])
    try:
        code = cli.main([str(a) for a in case.argv])
    finally:
        if case.cleanup is not None:
            case.cleanup()
    err = capsys.readouterr().err
    assert code == 1, f"{name}: exit {code}, stderr: {err}"
    assert f"{case.error.__name__}:" in err, f"{name}: expected {case.error.__name__}, got: {err}"
    for culprit in case.culprits:
        assert str(culprit) in err, f"{name}: the message does not name {culprit!r}: {err}"
    assert "Traceback" not in err
    assert tree_digest(work, skip=skip) == before, f"{name}: files outside the intended output changed"
    assert tree_digest(base["root"]) == base_before
    if case.out is not None and case.out_untouched:
        assert not Path(case.out).exists() or case.out_before == tree_digest(Path(case.out))
