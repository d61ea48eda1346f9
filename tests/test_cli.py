"""The `gradcamo-dask` command: --help everywhere, score / info end to end, the demo's code path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gradcamo_dask import cli
from gradcamo_dask.profiles.store import open_profiles
from tests.helpers.plate_fixtures import make_bundle, make_plate


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_for_every_subcommand(capsys):
    names = _subcommands()
    assert {"demo", "score", "info", "synth", "segment"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"gradcamo-dask {name}" in out and "--help" in out
    score_help = subprocess.run([sys.executable, "-m", "gradcamo_dask.cli", "score", "--help"], capture_output=True,
                                text=True, check=True).stdout
    for option in ("--labels", "--model", "--out", "--layers", "--scheduler", "--overwrite", "--cluster",
                   "--cluster-config", "--tls-ca-file", "--tls-cert", "--tls-key"):
        assert option in score_help


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "plate": make_plate(root / "plate.zarr"), "bundle": make_bundle(root / "bundle"),
            "other": make_bundle(root / "other", seed=2)}


@pytest.fixture(scope="module")
def scheduler():
    """One single-worker cluster that the CLI calls join with --scheduler (starting one per call costs ~20 s)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_score_then_info_then_refuse_another_bundle(tiny, scheduler, capsys):
    out = tiny["root"] / "profiles.zarr"
    args = ["score", str(tiny["plate"]), "--labels", str(tiny["plate"]), "--model", str(tiny["bundle"]),
            "--out", str(out), "--scheduler", scheduler, "--quiet", "--chunk-cells", "8"]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "scoring" in printed.out and "wrote" in printed.out
    ds = open_profiles(out)
    assert ds.sizes["cell"] > 10 and list(ds["layer"].values) == ["_head_swish", "_blocks.4.10"]

    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "profiles" and info["cells"] == ds.sizes["cell"] and info["complete"] is True
    assert len(info["sites_done"]) == 8 and info["sites_pending"] == []
    assert cli.main(["info", str(tiny["plate"])]) == 0
    text = capsys.readouterr().out
    assert "kind: plate" in text and "channels: ['DNA', 'ER', 'RNA', 'AGP', 'Actin', 'Mito']" in text

    # the rerun with the same inputs resumes (nothing left to do)
    assert cli.main(args) == 0
    assert "0 written now" in capsys.readouterr().out
    other = [*args[:5], str(tiny["other"]), *args[6:]]
    assert cli.main(other) == 1
    assert "OutputStoreError" in capsys.readouterr().err
    np.testing.assert_array_equal(open_profiles(out)["logits"].values, ds["logits"].values)  # untouched
    assert cli.main([*other, "--overwrite", "--classic", "default"]) == 0  # classic features ride along
    replaced = open_profiles(out)
    names = [str(v) for v in replaced["classic_feature"].values]
    values = replaced["classic"].values
    assert len(names) > 100 and values.shape == (replaced.sizes["cell"], len(names))
    for name in ("AreaShape_Volume", "Intensity_MeanIntensity_DNA"):  # measured for every cell
        column = values[:, names.index(name)]
        assert np.all(np.isfinite(column)) and np.all(column > 0), name


def test_score_refuses_bad_input_with_exit_1(tiny, scheduler, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ["score", str(tiny["plate"]), "--labels", str(tiny["plate"]), "--model", str(tiny["bundle"]),
            "--out", str(tiny["root"] / "never.zarr"), "--quiet"]
    start = time.monotonic()
    assert cli.main([*base, "--scheduler", f"tcp://127.0.0.1:{port}"]) == 1
    assert time.monotonic() - start < 30
    assert "ClusterError" in capsys.readouterr().err
    wrong = make_bundle(tiny["root"] / "wrong", classes=["control", "compound_1uM"])
    assert cli.main([*base[:5], str(wrong), *base[6:], "--scheduler", scheduler]) == 1
    err = capsys.readouterr().err
    assert "BundleMismatchError" in err and "compound_10uM" in err
    assert not (tiny["root"] / "never.zarr").exists()  # bad input never leaves a store behind


def test_demo_code_path_trains_scores_and_summarises(tmp_path, scheduler):
    from gradcamo_dask.jobs.demo import format_summary, run_demo

    tiny_settings = dict(doses_um=(0.0, 10.0), sites_per_well=1, site_shape=(9, 96, 96), cell_radius=12.0,
                         crop_shape=(None, 48, 48), input_shape=(8, 32, 32), epochs=1)
    result = run_demo(tmp_path / "demo", settings=tiny_settings, scheduler=scheduler, progress=False, log=lambda *_: None)
    summary = result["summary"]
    assert set(summary["treatment"]) == {"control", "compound_10uM"}
    assert set(summary["layer"]) == {"_blocks.4.10", "_head_swish"}  # the demo's two layers
    for _, per_layer in summary.groupby("layer"):
        assert per_layer["n"].sum() == result["n_cells"] > 0
    assert ((summary["share_on_target"] >= 0) & (summary["share_on_target"] <= 1)).all()
    text = format_summary(summary)
    assert "±" in text and "compound_10uM" in text
    assert (tmp_path / "demo" / "model" / "config.json").is_file()
    assert (tmp_path / "demo" / "summary.csv").is_file()
