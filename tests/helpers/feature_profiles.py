"""Small profiles datasets that follow CONTRACTS.md's "Profiles" layout exactly, for the feature-stack tests.

``make_profiles`` builds one from a cell table: deep features with a treatment effect,
logits, predictions, per-layer Grad-CAMO with its two sums (some undefined), low-res
CAMs per layer, optional classic features, and provenance naming the plate it came from.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import xarray as xr

LAYERS = ("_blocks.10", "_head_swish")
GRIDS = {"_blocks.10": (2, 7, 7), "_head_swish": (1, 4, 4)}
WIDTHS = {"_blocks.10": 12, "_head_swish": 20}


def synthetic_cells(n_wells: int = 4, sites: int = 2, cells_per_site: int = 15, plate: str = "P1") -> pd.DataFrame:
    """A cell table (CONTRACTS columns) without images: wells B02.. with doses 0, 0, 1, 10 µM."""
    doses = [0.0, 0.0, 1.0, 10.0, 0.3, 3.0][:n_wells]
    rows = []
    for w, dose in enumerate(doses):
        for s in range(sites):
            for k in range(cells_per_site):
                rows.append({
                    "plate": plate, "well": f"B{w + 2:02d}", "site": s, "object_number": k + 1,
                    "center_z": 10.0, "center_y": 30.0 + k, "center_x": 40.0 + 2 * k,
                    "bbox_z0": 5, "bbox_z1": 16, "bbox_y0": 20 + k, "bbox_y1": 41 + k, "bbox_x0": 30, "bbox_x1": 51,
                    "volume_voxels": 2000 + 10 * k, "touches_border": False, "crop_padded": False,
                    "treatment": "control" if dose == 0 else f"compound_{dose:g}uM", "dose": dose,
                    "is_control": dose == 0,
                })
    return pd.DataFrame(rows)


def make_profiles(
    cells: pd.DataFrame,
    *,
    seed: int = 0,
    classic: bool = False,
    gradcamo: bool = True,
    n_undefined: int = 3,
    provenance: dict | None = None,
) -> xr.Dataset:
    """A profiles Dataset for ``cells`` (CONTRACTS "Profiles"), deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    cells = cells.reset_index(drop=True)
    n = len(cells)
    classes = sorted(set(cells["treatment"]), key=lambda t: float(cells.loc[cells.treatment == t, "dose"].iloc[0]))
    response = np.log1p(cells["dose"].to_numpy(float))
    deep_parts, names, layer_of, index_of = [], [], [], []
    for layer in LAYERS:
        width = WIDTHS[layer]
        mixing = rng.normal(size=(width, width)) / np.sqrt(width)
        base = rng.normal(size=(n, width)) @ mixing  # correlated features
        base[:, 0] += 2.0 * response
        base[:, 1] -= 1.0 * response
        deep_parts.append(base)
        names += [f"{layer}_{i}" for i in range(width)]
        layer_of += [layer] * width
        index_of += list(range(width))
    deep = np.concatenate(deep_parts, axis=1).astype(np.float32)
    class_index = np.array([classes.index(t) for t in cells["treatment"]])
    logits = rng.normal(size=(n, len(classes))).astype(np.float32)
    logits[np.arange(n), class_index] += 2.0
    coords = {col: ("cell", cells[col].to_numpy()) for col in cells.columns}
    coords.update({
        "feature": np.asarray(names, dtype=str), "feature_layer": ("feature", np.asarray(layer_of, dtype=str)),
        "feature_index": ("feature", np.asarray(index_of, dtype=np.int64)), "class": np.asarray(classes, dtype=str),
    })
    ds = xr.Dataset(
        {
            "deep": (("cell", "feature"), deep),
            "logits": (("cell", "class"), logits),
            "predicted": ("cell", logits.argmax(axis=1).astype(np.int16)),
        },
        coords=coords,
    )
    if gradcamo:
        ds = ds.assign_coords(layer=np.asarray(LAYERS, dtype=str))
        scores = np.clip(rng.beta(1.2, 2.0, size=(n, len(LAYERS))), 0, 1)
        scores[:, 1] = np.clip(scores[:, 1] + 0.15, 0, 1)  # the head layer is better on target
        totals = rng.uniform(0.5, 5.0, size=(n, len(LAYERS)))
        undefined = rng.choice(n, size=min(n_undefined, n), replace=False)
        scores[undefined, 0] = np.nan
        totals[undefined, 0] = 0.0
        ds["gradcamo"] = (("cell", "layer"), scores)
        ds["cam_inside"] = (("cell", "layer"), np.where(np.isnan(scores), 0.0, scores * totals))
        ds["cam_total"] = (("cell", "layer"), totals)
        for k, layer in enumerate(LAYERS):
            z, y, x = GRIDS[layer]
            cam = rng.gamma(1.0, 1.0, size=(n, z, y, x)).astype(np.float32)
            cam[undefined] = 0.0 if k == 0 else cam[undefined]
            ds[f"cam_lowres_{k}"] = ((("cell", f"cam{k}_z", f"cam{k}_y", f"cam{k}_x")), cam)
            ds[f"cam_lowres_{k}"].attrs["layer"] = layer
    if classic:
        classic_names = ["AreaShape_Volume", "AreaShape_SurfaceArea", "Intensity_MeanIntensity_DNA",
                         "Intensity_MeanIntensity_Mito", "Texture_Contrast_DNA_3_00_256", "Granularity_1_DNA"]
        values = rng.normal(size=(n, len(classic_names))) + response[:, None] * np.linspace(0.5, 1.5, len(classic_names))
        values[:, 0] = cells["volume_voxels"].to_numpy(float)
        ds["classic"] = (("cell", "classic_feature"), values.astype(np.float32))
        ds = ds.assign_coords(classic_feature=np.asarray(classic_names, dtype=str))
    prov = {
        "bundle": {"path": "model-bundle", "hash": "0" * 64, "architecture": "efficientnet3d"},
        "layers": list(LAYERS), "crop_size": [None, 128, 128], "plate_path": None, "labels_path": None,
        "parameters": {"target": "predicted"}, "versions": {"gradcamo_dask": "0.1.0"},
    }
    prov.update(provenance or {})
    ds.attrs["provenance"] = json.dumps(prov)
    ds.attrs["plate"] = str(cells["plate"].iloc[0]) if n else "plate"
    return ds


def tiny_cnn(in_channels: int, num_classes: int, seed: int = 0):
    """The tests' TinyCNN, 8 wide, second convolution strided (1, 4, 4): real Grad-CAM maps, cheaply."""
    from tests.helpers.engine_models import seeded_tiny_cnn

    return seeded_tiny_cnn(in_channels, num_classes, seed, width=8, stride=(1, 4, 4))


def profiles_from_model(image, labels, cells: pd.DataFrame, size, model, layers, *, provenance=None) -> xr.Dataset:
    """Profiles (the profiles store layout) scored for real: crops, one explain pass, low-res CAMs.

    A stand-in for the pipeline's ``score_plate`` on a tiny model: what it stores
    (scores, sums and low-res maps) comes from :func:`gradcamo_dask.engine.explain`.
    """
    from gradcamo_dask import explain, extract_crops
    from gradcamo_dask.cells import rescale_crops

    crops, masks = extract_crops(image, labels, cells, size)
    crops, masks = np.asarray(crops.compute()), np.asarray(masks.compute())
    classes = sorted(set(cells["treatment"]), key=lambda t: float(cells.loc[cells.treatment == t, "dose"].iloc[0]))
    out = explain(model, np.asarray(rescale_crops(crops)), masks, layers=list(layers))
    cells = cells.reset_index(drop=True)
    coords = {col: ("cell", cells[col].to_numpy()) for col in cells.columns}
    feats = np.concatenate([out.features[layer] for layer in layers], axis=1).astype(np.float32)
    coords.update({
        "feature": np.asarray([f"{layer}_{i}" for layer in layers for i in range(out.features[layer].shape[1])]),
        "feature_layer": ("feature", np.asarray([layer for layer in layers for _ in range(out.features[layer].shape[1])])),
        "feature_index": ("feature", np.concatenate([np.arange(out.features[layer].shape[1]) for layer in layers])),
        "class": np.asarray(classes[: out.logits.shape[1]] + [f"class_{k}" for k in range(len(classes),
                                                                                          out.logits.shape[1])]),
        "layer": np.asarray(list(layers)),
    })
    ds = xr.Dataset({
        "deep": (("cell", "feature"), feats),
        "logits": (("cell", "class"), out.logits.astype(np.float32)),
        "predicted": ("cell", out.predicted.astype(np.int16)),
        "gradcamo": (("cell", "layer"), np.stack([out.gradcamo[layer] for layer in layers], axis=1)),
        "cam_inside": (("cell", "layer"), np.stack([out.cam_inside[layer] for layer in layers], axis=1)),
        "cam_total": (("cell", "layer"), np.stack([out.cam_total[layer] for layer in layers], axis=1)),
    }, coords=coords)
    for k, layer in enumerate(layers):
        ds[f"cam_lowres_{k}"] = (("cell", f"cam{k}_z", f"cam{k}_y", f"cam{k}_x"), out.cams[layer].astype(np.float32))
        ds[f"cam_lowres_{k}"].attrs["layer"] = layer
    prov = {"bundle": {"path": None, "hash": None, "architecture": "tinycnn"}, "layers": list(layers),
            "crop_size": [None if s is None else int(s) for s in size]}
    prov.update(provenance or {})
    ds.attrs["provenance"] = json.dumps(prov)
    ds.attrs["plate"] = str(cells["plate"].iloc[0])
    return ds
