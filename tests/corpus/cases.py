"""Builders of the bad-input corpus: ``CASES[name](paths) -> Case``.

``paths`` holds ``root`` (the case's folder), ``plate`` and ``bundle`` (fresh copies
of a tiny plate with labels inside and of a tiny bundle) and, for builders marked
``needs_scheduler``, ``scheduler`` (the address of a one-worker cluster).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcamo_dask import errors
from tests.helpers.tree_digest import tree_digest


@dataclass
class Case:
    argv: list[Any]
    error: type
    culprits: tuple[Any, ...]
    out: Path | None = None  # the intended output (may change); None: nothing may change
    out_untouched: bool = False  # the output existed before and must not change either
    out_before: dict = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None  # stops servers the case started


CASES: dict[str, Callable[[dict], Case]] = {}


def case(needs_scheduler: bool = False):
    def register(build):
        build.needs_scheduler = needs_scheduler
        CASES[build.__name__] = build
        return build
    return register


def score(p: dict, out: Any, *extra: Any) -> list[Any]:
    return ["score", p["plate"], "--labels", p["plate"], "--model", p["bundle"], "--out", out, "--quiet", *extra]


# ------------------------------------------------------------------ 1. output safety


def _user_folder(root: Path) -> Path:
    folder = root / "my-results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("a user's own file")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return folder


@case()
def score_out_is_a_user_folder(p):
    folder = _user_folder(p["root"])
    return Case(score(p, folder), errors.OutputStoreError, (folder, "not a gradcamo-dask profiles store"))


@case()
def score_out_is_a_user_folder_with_overwrite(p):
    folder = _user_folder(p["root"])
    return Case(score(p, folder, "--overwrite"), errors.OutputStoreError, (folder, "--overwrite replaces only"))


@case()
def score_out_is_a_file(p):
    target = p["root"] / "table.csv"
    target.write_text("x\n1\n")
    return Case(score(p, target, "--overwrite"), errors.OutputStoreError, (target,))


@case()
def score_out_is_the_plate(p):
    return Case(score(p, p["plate"], "--overwrite"), errors.OutputStoreError, (p["plate"], "is the plate"))


@case()
def score_out_inside_the_plate(p):
    out = p["plate"] / "profiles.zarr"
    return Case(score(p, out, "--overwrite"), errors.OutputStoreError, (out, "lies inside the plate"))


@case()
def score_out_contains_the_bundle(p):
    return Case(score(p, p["root"], "--overwrite"), errors.OutputStoreError, ("contains the plate",))


@case()
def score_out_is_a_link_to_the_plate(p):
    link = p["root"] / "link.zarr"
    link.symlink_to(p["plate"], target_is_directory=True)
    return Case(score(p, link, "--overwrite"), errors.OutputStoreError, (link, "is the plate"))


@case()
def score_out_is_the_bundle(p):
    return Case(score(p, p["bundle"], "--overwrite"), errors.OutputStoreError, (p["bundle"], "is the bundle"))


@case()
def segment_out_inside_the_plate(p):
    out = p["plate"] / "labels2.zarr"
    return Case(["segment", p["plate"], "--out", out, "--method", "watershed"], errors.OutputStoreError,
                (out, "lies inside the plate"))


@case()
def train_out_is_the_plate(p):
    return Case(["train", p["plate"], "--out", p["plate"], "--epochs", "1"], errors.OutputStoreError,
                (p["plate"], "is the plate"))


@case()
def train_out_is_a_user_folder(p):
    folder = _user_folder(p["root"])
    return Case(["train", p["plate"], "--out", folder, "--epochs", "1"], errors.OutputStoreError,
                (folder, "notes.txt", "not a gradcamo-dask training output"))


@case()
def report_out_is_the_plate(p):
    return Case(["report", p["root"] / "profiles.zarr", "--out", p["plate"], "--plate", p["plate"]],
                errors.OutputStoreError, ("is the plate",))


@case()
def synth_out_is_a_user_folder(p):
    folder = _user_folder(p["root"])
    return Case(["synth", folder, "--overwrite", "--quiet"], errors.OutputStoreError, (folder,))


# ------------------------------------------------------------------ 2. input identity


def _change_pixels(plate: Path) -> None:
    """Same names, wells, labels and cells; other pixels in one site's image chunk."""
    import numpy as np
    import zarr

    field = zarr.open_group(plate / "B" / "2" / "0", mode="r+")
    array = field["0"]
    array[0] = np.asarray(array[0]) // 2 + 1


@case(needs_scheduler=True)
def score_store_of_other_pixels_is_not_done(p):
    from gradcamo_dask import cli

    out = p["root"] / "profiles.zarr"
    args = score(p, out, "--scheduler", p["scheduler"])
    assert cli.main([str(a) for a in args]) == 0
    _change_pixels(p["plate"])
    return Case(args, errors.OutputStoreError, (out, "another run"), out=out, out_untouched=True,
                out_before=tree_digest(out))


# ------------------------------------------------------------------ 3. hangs


@case()
def score_scheduler_is_an_http_server(p):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.server_address[1]}"

    def stop():
        server.shutdown()
        server.server_close()

    out = p["root"] / "profiles.zarr"
    return Case(score(p, out, "--scheduler", address, "--timeout", "2"), errors.ClusterError,
                (address, "not a Dask scheduler"), out=out, cleanup=stop)


# ------------------------------------------------------------------ 8. validation before any store


@case()
def score_batch_size_zero(p):
    out = p["root"] / "profiles.zarr"
    return Case(score(p, out, "--batch-size", "0"), errors.InputError, ("--batch-size", "got 0"))


@case()
def score_batch_size_negative(p):
    out = p["root"] / "profiles.zarr"
    return Case(score(p, out, "--batch-size", "-4"), errors.InputError, ("--batch-size", "got -4"))


@case()
def score_chunk_cells_zero(p):
    out = p["root"] / "profiles.zarr"
    return Case(score(p, out, "--chunk-cells", "0"), errors.InputError, ("--chunk-cells",))


@case()
def score_negative_worker_timeout(p):
    out = p["root"] / "profiles.zarr"
    return Case(score(p, out, "--worker-timeout", "-1", "--scheduler", "tcp://127.0.0.1:9"), errors.InputError,
                ("--worker-timeout",))


# ------------------------------------------------------------------ 4. silent wrong answers


@case(needs_scheduler=True)
def score_label_ids_beyond_int32(p):
    import numpy as np
    import zarr

    from gradcamo_dask.io.plate import open_labels, open_plate

    image = open_plate(p["plate"])
    labels = np.asarray(open_labels(p["plate"], like=image).values).astype(np.int64)
    site = labels[1, 0]
    site[site > 0] += 2**32  # ids that an int32 cast would wrap onto other cells
    store = p["root"] / "big-labels.zarr"
    group = zarr.open_group(store, mode="w")
    group.create_array("labels", data=labels, chunks=(1, 1, *labels.shape[2:]))
    group.attrs.update({"wells": [str(w) for w in image["well"].values], "plate": "tiny"})
    out = p["root"] / "profiles.zarr"
    args = ["score", p["plate"], "--labels", store, "--model", p["bundle"], "--out", out, "--quiet",
            "--scheduler", p["scheduler"]]
    return Case(args, errors.LabelsError, (store, f'well "{image["well"].values[1]}", site 0', "int32"), out=out)


# ------------------------------------------------------------------ 7. errors that name the culprit


def _edit_config(bundle: Path, edit) -> Path:
    import json

    file = bundle / "config.json"
    raw = json.loads(file.read_text())
    result = edit(raw)
    file.write_text(result if isinstance(result, str) else json.dumps(raw))
    return file


@case()
def bundle_config_missing_keys(p):
    file = _edit_config(p["bundle"], lambda raw: raw.pop("normalization"))
    out = p["root"] / "profiles.zarr"
    return Case(score(p, out, "--scheduler", "tcp://127.0.0.1:9"), errors.MetadataError, (file, "normalization"))


@case()
def bundle_config_empty(p):
    file = _edit_config(p["bundle"], lambda raw: "")
    return Case(score(p, p["root"] / "o.zarr"), errors.MetadataError, (file, "empty"))


@case()
def bundle_config_not_json(p):
    file = _edit_config(p["bundle"], lambda raw: "{'format': oops")
    return Case(score(p, p["root"] / "o.zarr"), errors.MetadataError, (file, "not JSON"))


@case()
def bundle_zero_std(p):
    def zero(raw):
        raw["normalization"]["std"][2] = 0.0

    file = _edit_config(p["bundle"], zero)
    return Case(score(p, p["root"] / "o.zarr"), errors.MetadataError, (file, "RNA", "> 0"))


@case()
def bundle_crop_fill_unknown(p):
    file = _edit_config(p["bundle"], lambda raw: raw.update(crop_fill="edge"))
    return Case(score(p, p["root"] / "o.zarr"), errors.MetadataError, (file, "crop_fill", "'edge'"))


@case()
def weights_truncated_without_hash(p):
    _edit_config(p["bundle"], lambda raw: raw.pop("weights_sha256") and None)
    weights = p["bundle"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Case(score(p, p["root"] / "o.zarr"), errors.WeightsFormatError, (weights, "safetensors"))


@case()
def weights_not_safetensors_without_hash(p):
    import pickle

    _edit_config(p["bundle"], lambda raw: raw.pop("weights_sha256") and None)
    weights = p["bundle"] / "model.safetensors"
    weights.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))  # a pickle is never loaded
    return Case(score(p, p["root"] / "o.zarr"), errors.WeightsFormatError, (weights, "never loaded"))


@case()
def platemap_not_utf8(p):
    platemap = p["root"] / "platemap.csv"
    platemap.write_bytes("well,treatment\nB02,caf\xe9ine\n".encode("latin-1"))
    return Case([*score(p, p["root"] / "o.zarr"), "--platemap", platemap], errors.MetadataError,
                (platemap, "UTF-8"))


@case()
def platemap_empty(p):
    platemap = p["root"] / "platemap.csv"
    platemap.write_text("")
    return Case([*score(p, p["root"] / "o.zarr"), "--platemap", platemap], errors.MetadataError,
                (platemap, "empty"))


@case()
def ngff_site_without_labels_group(p):
    import shutil

    shutil.rmtree(p["plate"] / "B" / "2" / "0" / "labels")
    return Case(score(p, p["root"] / "o.zarr"), errors.LabelsError, ("no 'labels' group", "B02", "--labels"))


@case()
def info_on_a_file(p):
    file = p["root"] / "notes.txt"
    file.write_text("hello")
    return Case(["info", file], errors.PlateLayoutError, (file, "is a file"))


@case()
def info_on_an_empty_folder(p):
    folder = p["root"] / "empty"
    folder.mkdir()
    return Case(["info", folder], errors.PlateLayoutError, (folder, "empty folder"))


def _interrupted_store(root: Path) -> Path:
    """A profiles store whose setup stopped after its template, before any done-marker existed."""
    import numpy as np
    import xarray as xr

    from gradcamo_dask.profiles.store import COMPLETE_ATTR, FINGERPRINT_ATTR

    store = root / "interrupted.zarr"
    ds = xr.Dataset({"gradcamo": (("cell", "layer"), np.zeros((3, 1)))},
                    coords={"cell": np.arange(3), "layer": ["_head_swish"]})
    ds.attrs.update({FINGERPRINT_ATTR: "sha256:x", COMPLETE_ATTR: False})
    ds.to_zarr(store, mode="w", consolidated=False)
    return store


@case()
def report_on_a_store_whose_setup_was_interrupted(p):
    store = _interrupted_store(p["root"])
    out = p["root"] / "report"
    return Case(["report", store, "--out", out], errors.OutputStoreError, (store, "setup was interrupted"), out=out)
