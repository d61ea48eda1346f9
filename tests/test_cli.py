"""The `gradcamo-dask` command: --help everywhere, score / info end to end, the demo's code path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
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
                   "--cluster-config", "--tls-ca-file", "--tls-cert", "--tls-key", "--cam-method"):
        assert option in score_help


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "plate": make_plate(root / "plate.zarr"), "bundle": make_bundle(root / "bundle"),
            "other": make_bundle(root / "other", seed=2)}


@pytest.fixture(scope="module")
def scheduler(one_worker_scheduler):
    """The session's single-worker cluster that the CLI calls join with --scheduler (one costs ~20 s to start)."""
    return one_worker_scheduler


def test_info_describes_a_bundle_and_refuses_a_broken_one(tiny, tmp_path, capsys):
    import shutil

    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.engine.layers import layer_grids

    bundle = open_bundle(tiny["bundle"])
    before = {p.name: p.stat().st_mtime_ns for p in tiny["bundle"].iterdir()}
    assert cli.main(["info", str(tiny["bundle"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    grids = layer_grids(bundle.model, tuple(bundle.config.input_shape))
    assert info["kind"] == "bundle" and info["architecture"] == "efficientnet3d" and info["hash"] == bundle.hash
    assert info["channels"] == bundle.config.channels and info["classes"] == bundle.config.classes
    assert info["layers"] == {name: list(grids[name]) for name in bundle.config.layers}
    assert info["parameters"] == sum(p.numel() for p in bundle.model.parameters())
    assert info["crop_fill"] == "zero" and info["intensity_scaling"] == "crop (min-max per crop)"
    assert {p.name: p.stat().st_mtime_ns for p in tiny["bundle"].iterdir()} == before  # read only
    assert cli.main(["info", str(tiny["bundle"])]) == 0
    text = capsys.readouterr().out
    assert "kind: bundle" in text and "crop_fill: zero" in text
    assert f"layers:\n  {bundle.config.layers[0]}: {list(grids[bundle.config.layers[0]])}\n" in text  # one per line
    broken = tmp_path / "broken"
    shutil.copytree(tiny["bundle"], broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of the weights changed: the config's sha256 no longer matches
    weights.write_bytes(bytes(data))
    assert cli.main(["info", str(broken)]) == 1
    assert "BundleMismatchError" in capsys.readouterr().err


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
    assert cli.main(["info", str(out)]) == 0  # the text form, as README's "Scoring a plate" shows it
    text = capsys.readouterr().out
    assert "kind: profiles" in text and f"cells: {ds.sizes['cell']}" in text and "complete: True" in text
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


def test_score_with_hirescam_maps_records_the_method(tiny, scheduler, capsys):
    out = tiny["root"] / "hirescam.zarr"
    args = ["score", str(tiny["plate"]), "--labels", str(tiny["plate"]), "--model", str(tiny["bundle"]),
            "--out", str(out), "--scheduler", scheduler, "--quiet", "--layers", "_blocks.1.1"]
    assert cli.main([*args, "--cam-method", "hirescam"]) == 0
    ds = open_profiles(out)
    assert json.loads(ds.attrs["provenance"])["parameters"]["cam_method"] == "hirescam"
    assert np.isfinite(ds["gradcamo"].values).mean() > 0.5
    capsys.readouterr()
    assert cli.main([*args, "--cam-method", "gradcam"]) == 1  # not mixed into the HiResCAM store
    assert "OutputStoreError" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--cam-method", "gradcam++"])
    assert exit_info.value.code == 2


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


def test_demo_code_path_trains_two_models_and_compares_them(tiny_demo):
    from gradcamo_dask.jobs.demo import DEMO, MODELS, format_comparison, format_summary

    # run_demo(TINY_DEMO settings, the session's one-worker scheduler), made once for this test and test_demo
    result, demo = tiny_demo["result"], tiny_demo["out"]
    table = result["comparison"]
    assert set(table["model"]) == set(MODELS) == {"own_cell", "neighbours"}
    assert set(table["layer"]) == set(DEMO["layers"])
    from gradcamo_dask.engine.layers import layer_grids
    from gradcamo_dask.engine.models import efficientnet3d

    grids = layer_grids(efficientnet3d(in_channels=6, num_classes=2, input_shape=DEMO["input_shape"]),
                        DEMO["input_shape"])
    assert all(min(grids[k][-2:]) >= 3 for k in DEMO["layers"]), grids  # the demo's maps can localise a cell
    assert table["cells"].groupby(table["model"]).first().sum() == result["n_cells"] > 0
    assert ((table["uniform_reference"] > 0) & (table["uniform_reference"] < 0.5)).all()
    np.testing.assert_allclose(table["times_uniform"], table["gradcamo_mean"] / table["uniform_reference"])
    # each model scored its own population of the held-out wells: responders vs bystanders of the truth table
    truth = pd.read_csv(demo / "plate.zarr" / "cell_truth.csv")
    for name, responder in MODELS.items():
        profiles = open_profiles(demo / f"profiles_{name}.zarr")
        cells = pd.DataFrame({"well": [str(w) for w in profiles["well"].values], "site": profiles["site"].values,
                              "object_number": profiles["object_number"].values})
        roles = cells.merge(truth, on=["well", "site", "object_number"], how="left")["responder"]
        assert roles.notna().all() and (roles == responder).all()
        assert (demo / f"report_{name}" / "index.html").is_file()
    text = format_comparison(table)
    assert "own_cell" in text and "neighbours" in text and "uniform map" in text
    # the same models scored with HiResCAM maps beside the paper's Grad-CAM: rows, store, table lines
    assert set(table["map"]) == {"gradcam", "hirescam"}
    for (name, layer), rows in table.groupby(["model", "layer"]):
        assert len(rows) == 2 and rows["cells"].nunique() == 1 and rows["uniform_reference"].nunique() == 1
        hires = open_profiles(demo / f"profiles_{name}_hirescam.zarr")
        assert json.loads(hires.attrs["provenance"])["parameters"]["cam_method"] == "hirescam"
        np.testing.assert_allclose(rows.set_index("map").loc["hirescam", "gradcamo_mean"],
                                   np.nanmean(hires["gradcamo"].sel(layer=layer).values))
    assert all(f"HiResCAM-O at {k}" in text and f"Grad-CAMO at {k}" in text for k in DEMO["layers"])
    assert {"compoundA_10uM", "compoundB_10uM"} <= set(result["summary"]["treatment"])
    assert "compoundA_10uM" in format_summary(result["summary"])
    assert (demo / "comparison.csv").is_file() and (demo / "summary.csv").is_file()


def test_tls_options_with_a_tcp_scheduler_give_a_named_error(tiny, tmp_path, capsys):
    pem = {name: tmp_path / f"{name}.pem" for name in ("ca", "client", "client-key")}
    for path in pem.values():
        path.write_text("not used: the address is refused before any file is read\n")
    base = ["score", str(tiny["plate"]), "--labels", str(tiny["plate"]), "--model", str(tiny["bundle"]),
            "--out", str(tmp_path / "never.zarr"), "--quiet"]
    tls = ["--tls-ca-file", str(pem["ca"]), "--tls-cert", str(pem["client"]), "--tls-key", str(pem["client-key"])]
    assert cli.main([*base, "--scheduler", "tcp://127.0.0.1:8786", *tls]) == 1
    err = capsys.readouterr().err
    assert "ClusterError" in err and "not a TLS address" in err and "tls://127.0.0.1:8786" in err
    assert "Traceback" not in err
    assert cli.main([*base, "--scheduler", "tls://127.0.0.1:8786", "--tls-ca-file", str(tmp_path / "no.pem"),
                     "--tls-cert", str(pem["client"])]) == 1
    assert "--tls-ca-file" in capsys.readouterr().err and not (tmp_path / "never.zarr").exists()


def test_help_shows_defaults_and_workflow_order():
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["synth", "segment", "train", "score", "export", "compare", "report", "info", "demo",
                                 "bench-report"]
    for name, command in sub.choices.items():
        command.format_help()  # renders without error
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            if not action.required:
                formatted = command._get_formatter()._get_help_string(action)
                assert "default" in formatted.lower(), f"{name} {action.option_strings[0]} shows no default"
    train_help = sub.choices["train"].format_help()
    train_help = train_help[train_help.index("--help"):]  # the option list, not the usage line
    for option, default in (("--epochs", "50"), ("--batch-size", "8"), ("--seed", "0"), ("--val-fraction", "0.1")):
        block = train_help[train_help.index(option + " "):]
        assert f"(default: {default})" in " ".join(block.split()[:40]), option
    assert "(default: 2048)" in " ".join(sub.choices["segment"].format_help().split())


def test_synth_cell_radius(tmp_path, capsys):
    from gradcamo_dask import open_labels, open_plate

    small = ["synth", "--doses", "0", "--wells-per-treatment", "1", "--sites", "1", "--site-shape", "8", "96", "96",
             "--quiet"]
    assert cli.main([*small, str(tmp_path / "big.zarr")]) == 0
    assert cli.main([*small, "--cell-radius", "12", str(tmp_path / "small.zarr")]) == 0
    counts = []
    for name in ("big.zarr", "small.zarr"):
        image = open_plate(tmp_path / name)
        counts.append(len(np.unique(open_labels(tmp_path / name, like=image).values)) - 1)
    assert counts[1] > counts[0] >= 0, counts
