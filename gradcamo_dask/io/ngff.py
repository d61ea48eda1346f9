"""OME-Zarr HCS plates: a thin metadata walk over zarr-python, and a writer.

Reader choice: this module walks the NGFF metadata itself with zarr-python 3 (which
reads Zarr v2 and v3) instead of using a reader library, because

* the walk is small (plate -> wells -> fields -> multiscales/omero -> labels) and
  reads only the JSON it needs, so opening a 10,000-field plate touches metadata and
  nothing else (tests prove it with a store that counts reads);
* errors can name the exact key and file (``.../B/2/0/zarr.json: key
  "ome.multiscales[0].datasets[0].path" ...``) and the plate, well and site, which
  the design asks for and which generic validators do not do;
* each site becomes exactly one Dask task reading that field, the unit of work of
  the whole package; ``ome-zarr-py`` builds per-image pyramids of Dask arrays and
  ``ome-zarr-models`` (pydantic models of NGFF 0.4/0.5) validates strictly but
  builds no arrays and rejects slightly-off real-world plates outright.

``ome-zarr-models`` is used in the tests as the independent validator of what
:func:`write_hcs` writes. Supported: NGFF 0.4 (Zarr v2, metadata at the top level of
``.zattrs``) and 0.5 (Zarr v3, metadata under ``"ome"`` in ``zarr.json``); axes
``t``, ``c``, ``z``, ``y``, ``x`` in any order (time point 0 is read); voxel size
from the ``scale`` transformation of the full-resolution dataset (``datasets[0]``),
times any multiscale-level scale, converted to µm; channel names from
``omero.channels[].label``, else ``channel_0``, ``channel_1``, ...
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from gradcamo_dask.errors import InputError, LabelsError, MetadataError, OutputStoreError, PlateLayoutError
from gradcamo_dask.io.layout import czyx_shape, lazy_sites, plate_dataarray, to_czyx
from gradcamo_dask.io.platemap import PLATEMAP_FILE, row_order, split_well, well_name

_UNITS_UM = {
    None: 1.0, "micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3, "nm": 1e-3,
    "angstrom": 1e-4, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "meter": 1e6, "picometer": 1e-6,
}
_COLORS = {"DNA": "0000FF", "ER": "00FF00", "RNA": "FFFF00", "AGP": "FF0000", "Actin": "FF00FF", "Mito": "FF8000"}
_SPARE_COLORS = ("00FFFF", "FFFFFF", "808080", "8000FF")


# ---------------------------------------------------------------------- reading


class _Meta:
    """The NGFF attributes of one group and the file they live in (for error messages)."""

    def __init__(self, group: Any, where: str):
        self.group = group
        fmt = group.metadata.zarr_format
        inner = f"{group.path}/" if group.path else ""
        self.file = f"{where.rstrip('/')}/{inner}{'zarr.json' if fmt == 3 else '.zattrs'}"
        attrs = dict(group.attrs)
        if "ome" in attrs:
            self.ome, self.prefix = attrs["ome"], "ome."
            if not isinstance(self.ome, dict):
                raise MetadataError(f'{self.file}: key "ome" must be an object, got {type(self.ome).__name__}')
        else:
            self.ome, self.prefix = attrs, ""

    def need(self, obj: Any, key: str | int, kind: type, path: str) -> Any:
        """``obj[key]``, checked to be of ``kind``; MetadataError naming the key and file."""
        full = f"{self.prefix}{path}"
        try:
            value = obj[key]
        except (KeyError, IndexError, TypeError):
            raise MetadataError(f'{self.file}: key "{full}" is missing') from None
        if not isinstance(value, kind) or (kind is list and not value):
            raise MetadataError(f'{self.file}: key "{full}" must be a non-empty {kind.__name__}, got {value!r:.80}')
        return value


@dataclass
class _Field:
    array: Any  # the full-resolution zarr array
    axes: str  # upper-case axis letters, e.g. "CZYX"
    site_shape: tuple[int, ...]  # (c, z, y, x)
    spacing: tuple[float, float, float]  # z, y, x in µm
    channels: list[str] | None
    file: str


def is_ngff(group: Any) -> bool:
    """True when the group's attributes hold NGFF plate or image metadata."""
    attrs = dict(group.attrs)
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    return isinstance(ome.get("plate"), dict) or isinstance(ome.get("multiscales"), list)


def _parse_axes(meta: _Meta, m0: dict) -> tuple[str, list[str | None]]:
    axes = meta.need(m0, "axes", list, "multiscales[0].axes")
    names, units = [], []
    for k, axis in enumerate(axes):
        if isinstance(axis, str):
            name, unit = axis, None
        elif isinstance(axis, dict):
            name, unit = meta.need(axis, "name", str, f"multiscales[0].axes[{k}].name"), axis.get("unit")
        else:
            raise MetadataError(f'{meta.file}: key "{meta.prefix}multiscales[0].axes[{k}]" must be an object')
        if name.lower() not in "tczyx" or len(name) != 1 or name.upper() in names:
            raise MetadataError(f'{meta.file}: key "{meta.prefix}multiscales[0].axes[{k}].name" is {name!r}; '
                                f"expected distinct axes among t, c, z, y, x")
        if unit not in _UNITS_UM and name.lower() in "zyx":
            raise MetadataError(f'{meta.file}: key "{meta.prefix}multiscales[0].axes[{k}].unit" is {unit!r}; '
                                f"use a length unit such as 'micrometer'")
        names.append(name.upper())
        units.append(unit)
    return "".join(names), units


def _scale(meta: _Meta, transforms: Any, ndim: int, path: str) -> np.ndarray:
    if transforms is None:
        return np.ones(ndim)
    if not isinstance(transforms, list):
        raise MetadataError(f'{meta.file}: key "{meta.prefix}{path}" must be a list')
    out = np.ones(ndim)
    for k, t in enumerate(transforms):
        if not isinstance(t, dict) or t.get("type") not in ("scale", "translation", "identity"):
            raise MetadataError(f'{meta.file}: key "{meta.prefix}{path}[{k}].type" must be "scale" or "translation"')
        if t["type"] == "scale":
            scale = t.get("scale")
            if not isinstance(scale, list) or len(scale) != ndim or not all(isinstance(v, (int, float)) for v in scale):
                raise MetadataError(f'{meta.file}: key "{meta.prefix}{path}[{k}].scale" must list {ndim} numbers '
                                    f"(one per axis), got {scale!r}")
            out = out * np.asarray(scale, dtype=float)
    return out


def _parse_image(group: Any, where: str, context: str) -> _Field:
    """Axes, full-resolution array, spacing and channel names of one NGFF image group.

    Every MetadataError names the key and the file, then ``context`` (plate, well, site).
    """
    try:
        return _parse_image_metadata(group, where)
    except MetadataError as err:
        raise MetadataError(f"{err} ({context})") from None


def _parse_image_metadata(group: Any, where: str) -> _Field:
    import zarr

    meta = _Meta(group, where)
    m0 = meta.need(meta.need(meta.ome, "multiscales", list, "multiscales"), 0, dict, "multiscales[0]")
    axes, units = _parse_axes(meta, m0)
    d0 = meta.need(meta.need(m0, "datasets", list, "multiscales[0].datasets"), 0, dict, "multiscales[0].datasets[0]")
    path = meta.need(d0, "path", str, "multiscales[0].datasets[0].path")
    if "coordinateTransformations" not in d0:
        raise MetadataError(f'{meta.file}: key "{meta.prefix}multiscales[0].datasets[0].coordinateTransformations" '
                            f"is missing")
    scale = _scale(meta, d0["coordinateTransformations"], len(axes), "multiscales[0].datasets[0].coordinateTransformations")
    scale = scale * _scale(meta, m0.get("coordinateTransformations"), len(axes), "multiscales[0].coordinateTransformations")
    try:
        array = group[path]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise MetadataError(f'{meta.file}: key "{meta.prefix}multiscales[0].datasets[0].path" is {path!r}, but there is '
                            f"no array at {group.path}/{path}")
    if array.ndim != len(axes):
        raise MetadataError(f'{meta.file}: key "{meta.prefix}multiscales[0].axes" lists {len(axes)} axes ({axes}), '
                            f"the array at {path!r} has {array.ndim} dims {array.shape}")
    spacing = tuple(float(scale[axes.index(a)] * _UNITS_UM[units[axes.index(a)]]) if a in axes else 1.0 for a in "ZYX")
    probe = czyx_shape(array.shape, axes)
    channels = None
    omero = meta.ome.get("omero")
    if isinstance(omero, dict) and "channels" in omero:
        chans = meta.need(omero, "channels", list, "omero.channels")
        labels = [c.get("label") if isinstance(c, dict) else None for c in chans]
        if len(labels) != probe[0]:
            raise MetadataError(f'{meta.file}: key "{meta.prefix}omero.channels" lists {len(labels)} channels, the '
                                f"image has {probe[0]}")
        if all(isinstance(lab, str) and lab for lab in labels) and len(set(labels)) == len(labels):
            channels = labels
    if "T" in axes and array.shape[axes.index("T")] > 1:
        warnings.warn(f"{meta.file}: {array.shape[axes.index('T')]} time points; reading time point 0", stacklevel=4)
    return _Field(array, axes, probe, spacing, channels, meta.file)


def _read_field(array: Any, axes: str, with_c: bool) -> np.ndarray:
    """Read one field (time point 0) as ``(1, 1, c, z, y, x)`` (or without ``c``)."""
    selection = tuple(0 if a == "T" else slice(None) for a in axes)
    data = np.asarray(array[selection])
    czyx = to_czyx(data, axes.replace("T", ""), True)
    return (czyx if with_c else czyx[0])[None, None]


def _walk_plate(group: Any, where: str, plate: str | None) -> tuple[str, dict[str, list[Any]]]:
    """Plate name and ``{well: [field group, ...]}`` in plate order, from the plate metadata."""
    meta = _Meta(group, where)
    if "plate" not in meta.ome:  # a single image: one well, one site
        return plate or Path(where.rstrip("/")).stem or "plate", {"A01": [group]}
    pmeta = meta.need(meta.ome, "plate", dict, "plate")
    name = plate or pmeta.get("name") or Path(where.rstrip("/")).stem
    wells: dict[str, list[Any]] = {}
    order = []
    for i, w in enumerate(meta.need(pmeta, "wells", list, "plate.wells")):
        wpath = meta.need(w, "path", str, f"plate.wells[{i}].path")
        parts = wpath.strip("/").split("/")
        if len(parts) != 2 or not parts[1].isdigit() or not parts[0].isalpha():
            raise MetadataError(f'{meta.file}: key "{meta.prefix}plate.wells[{i}].path" is {wpath!r}; expected '
                                f'"<row letters>/<column number>" like "B/2"')
        wname = well_name(parts[0], parts[1])
        try:
            wgroup = group[wpath]
        except KeyError:
            raise MetadataError(f'{meta.file}: key "{meta.prefix}plate.wells[{i}].path" names well group {wpath!r}, '
                                f'which does not exist (plate "{name}", well "{wname}")') from None
        wmeta = _Meta(wgroup, where)
        try:
            images = wmeta.need(wmeta.need(wmeta.ome, "well", dict, "well"), "images", list, "well.images")
        except MetadataError as err:
            raise MetadataError(f'{err} (plate "{name}", well "{wname}")') from None
        fields = []
        for j, im in enumerate(images):
            ipath = wmeta.need(im, "path", str, f"well.images[{j}].path")
            try:
                fields.append(wgroup[ipath])
            except KeyError:
                raise MetadataError(f'{wmeta.file}: key "{wmeta.prefix}well.images[{j}].path" names field {ipath!r}, '
                                    f'which does not exist (plate "{name}", well "{wname}", site {j})') from None
        wells[wname] = fields
        order.append((row_order(parts[0].upper()), int(parts[1]), wname))
    return name, {w: wells[w] for *_, w in sorted(order)}


def _assemble(fields: dict[tuple[str, int], _Field], wells: list[str], n_sites: int, plate: str,
              with_c: bool, kind: str) -> tuple[da.Array, _Field]:
    """Check that all fields agree and stack them lazily, one task per site."""
    first_key = next(iter(fields))
    first = fields[first_key]
    dtype = first.array.dtype
    for (w, s), f in fields.items():
        if f.site_shape != first.site_shape or f.array.dtype != dtype:
            raise PlateLayoutError(
                f'plate "{plate}", well "{w}", site {s}: {kind} shape (c, z, y, x) = {f.site_shape} {f.array.dtype}, '
                f'but well "{first_key[0]}" site {first_key[1]} has {first.site_shape} {dtype}; every field of a '
                f"plate must have the same shape and dtype ({f.file})"
            )
        if with_c and f.channels and first.channels and f.channels != first.channels:
            raise PlateLayoutError(
                f'plate "{plate}", well "{w}", site {s}: channels {f.channels}, but well "{first_key[0]}" site '
                f"{first_key[1]} has {first.channels}; every field must list the same channels ({f.file})"
            )
        if not np.allclose(f.spacing, first.spacing, rtol=0.01):
            warnings.warn(f'plate "{plate}", well "{w}", site {s}: voxel size {f.spacing} µm differs from '
                          f"{first.spacing}; using the latter", stacklevel=4)
    counts = {w: sum(1 for (ww, _) in fields if ww == w) for w in wells}
    short = {w: n for w, n in counts.items() if n < n_sites}
    if short:
        warnings.warn(f'plate "{plate}": wells {sorted(short)} have fewer fields than {n_sites}; their missing sites '
                      f"read as zeros (no cells)", stacklevel=4)
    site_shape = first.site_shape if with_c else first.site_shape[1:]
    index = {w: i for i, w in enumerate(wells)}
    sources = {(index[w], s): (f.array, f.axes, with_c) for (w, s), f in fields.items()}
    name = f"ngff-{kind}-{tokenize(plate, [(k, f.file, f.site_shape, str(f.array.dtype)) for k, f in fields.items()])}"
    return lazy_sites(_read_field, sources, len(wells), n_sites, site_shape, dtype, name), first


def _root_attrs(group: Any) -> dict:
    extra = dict(group.attrs).get("gradcamo_dask")
    return dict(extra) if isinstance(extra, dict) else {}


def open_hcs(group: Any, where: str, plate: str | None = None) -> xr.DataArray:
    """An OME-Zarr HCS plate (or single image) as a lazy ``(well, site, c, z, y, x)`` DataArray."""
    name, wells = _walk_plate(group, where, plate)
    if not wells:
        raise PlateLayoutError(f'plate "{name}" at {where} lists no wells')
    fields = {(w, s): _parse_image(g, where, f'plate "{name}", well "{w}", site {s}')
              for w, groups in wells.items() for s, g in enumerate(groups)}
    n_sites = max(len(g) for g in wells.values())
    data, first = _assemble(fields, list(wells), n_sites, name, True, "image")
    channels = first.channels or [f"channel_{i}" for i in range(first.site_shape[0])]
    return plate_dataarray(data, wells=list(wells), channels=channels, plate=name, spacing_zyx_um=first.spacing,
                           attrs=_root_attrs(group))


def open_hcs_labels(group: Any, where: str, name: str | None = None) -> xr.DataArray:
    """Labels of an OME-Zarr plate: each field's ``labels/<name>``, or the fields
    themselves when they are label images (a separate labels plate)."""
    plate, wells = _walk_plate(group, where, None)
    fields = {}
    for w, groups in wells.items():
        for s, g in enumerate(groups):
            context = f'plate "{plate}", well "{w}", site {s}'
            if "labels" in g:
                lmeta = _Meta(g["labels"], where)
                names = lmeta.need(lmeta.ome, "labels", list, "labels")
                pick = name if name is not None else names[0]
                if pick not in names or pick not in g["labels"]:
                    raise LabelsError(f'{context}: no label image {pick!r} in {lmeta.file} (it lists {names})')
                field = _parse_image(g["labels"][pick], where, context)
            else:
                field = _parse_image(g, where, context)
                if field.site_shape[0] != 1 or field.channels and len(field.channels) > 1:
                    raise LabelsError(f"{context}: no 'labels' group in {field.file} (the field is a "
                                      f"{field.site_shape[0]}-channel image, not labels); write labels with "
                                      "write_plate(..., labels=), segment the plate (gradcamo-dask segment) or "
                                      "pass --labels")
                if not np.issubdtype(field.array.dtype, np.integer):
                    raise LabelsError(f"{context}: no 'labels' group in {field.file}, and the field is not a label "
                                      f"image (dtype {field.array.dtype}); write labels with write_plate(..., labels=)")
            if field.site_shape[0] != 1:
                raise LabelsError(f"{context}: the label image has {field.site_shape[0]} channels; labels need one "
                                  f"({field.file})")
            fields[(w, s)] = field
    n_sites = max(len(g) for g in wells.values())
    data, first = _assemble(fields, list(wells), n_sites, plate, False, "labels")
    return plate_dataarray(data, wells=list(wells), channels=None, plate=plate, spacing_zyx_um=first.spacing)


# ---------------------------------------------------------------------- writing


def _prepare_store(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not overwrite:
        raise OutputStoreError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    if not any((path / m).exists() for m in ("zarr.json", ".zgroup", ".zattrs")):
        raise OutputStoreError(f"{path} exists and is not a Zarr store; refusing to delete it. Choose another path.")
    shutil.rmtree(path)


def _image_attrs(name: str, channels: list[str], spacing: list[float], dtype: np.dtype) -> dict:
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    hi = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    spare = iter(_SPARE_COLORS * 8)
    return {"ome": {"version": "0.5", "multiscales": [{
        "name": name, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, *spacing]}]}],
    }], "omero": {"channels": [{
        "label": c, "color": _COLORS.get(c) or next(spare), "active": True,
        "window": {"min": 0.0, "max": hi, "start": 0.0, "end": hi},
    } for c in channels], "rdefs": {"model": "color"}}}}


def _label_attrs(name: str, spacing: list[float]) -> dict:
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    return {"ome": {"version": "0.5", "image-label": {"source": {"image": "../../"}}, "multiscales": [{
        "name": name, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, *spacing]}]}],
    }]}}


def _check_finite(block: np.ndarray, where: str) -> np.ndarray:
    from gradcamo_dask.arrays import array_module

    xp = array_module(block)
    if not bool(xp.isfinite(block).all()):
        raise InputError(f"{where}: the image holds NaN or inf intensities; fix or mask them before writing")
    return block


def _json_safe(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


@dataclass(frozen=True)
class HcsWriteOptions:
    """How :func:`write_hcs` writes: the NGFF label image's name, whether an existing store is
    replaced, whether to compute now (else return the ``dask.delayed`` write), a progress bar."""

    label_name: str = "cells"
    overwrite: bool = False
    compute: bool = True
    progress: bool = False


def write_hcs(path: Any, image: xr.DataArray, labels: xr.DataArray | None, platemap: pd.DataFrame | None,
              options: HcsWriteOptions) -> Any:
    """Write an OME-Zarr 0.5 HCS plate; :func:`gradcamo_dask.io.plate.write_plate` checks the inputs
    and documents the parameters."""
    label_name, overwrite, compute, progress = options.label_name, options.overwrite, options.compute, options.progress
    import zarr

    dims = ("well", "site", "c", "z", "y", "x")
    if tuple(image.dims) != dims:
        raise PlateLayoutError(f"write_plate needs image dims {dims}, got {tuple(image.dims)}")
    plate = str(image.attrs.get("plate", "plate"))
    spacing = [float(v) for v in image.attrs.get("spacing_zyx_um", (1.0, 1.0, 1.0))]
    channels = [str(c) for c in image["c"].values]
    wells = [str(w) for w in image["well"].values]
    n_c, n_z, n_y, n_x = (image.sizes[d] for d in dims[2:])
    dtype = np.dtype(image.dtype)
    path = Path(path)
    _prepare_store(path, overwrite)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)

    data = image.data if isinstance(image.data, da.Array) else da.asarray(image.data)
    lab = None
    if labels is not None:
        lab = labels.data if isinstance(labels.data, da.Array) else da.asarray(labels.data)
        lab = lab.astype(np.int32)
    sources, targets = [], []
    rows = sorted({split_well(w)[0] for w in wells}, key=row_order)
    columns = sorted({split_well(w)[1] for w in wells})
    plate_wells = []
    for wi, w in enumerate(wells):
        r, c = split_well(w)
        plate_wells.append({"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": columns.index(c)})
        wgroup = root.require_group(r).create_group(str(c), attributes={"ome": {"version": "0.5", "well": {
            "version": "0.5", "images": [{"path": str(s)} for s in range(image.sizes["site"])]}}})
        for s in range(image.sizes["site"]):
            where = f'plate "{plate}", well "{w}", site {s}'
            field = wgroup.create_group(str(s), attributes=_image_attrs(f"{w}/{s}", channels, spacing, dtype))
            targets.append(field.create_array("0", shape=(n_c, n_z, n_y, n_x), chunks=(1, n_z, n_y, n_x),
                                              dtype=dtype, dimension_names=("c", "z", "y", "x"), fill_value=0))
            block = data[wi, s]
            if np.issubdtype(dtype, np.floating):
                block = block.map_blocks(_check_finite, where=where, dtype=dtype)
            sources.append(block)
            if lab is not None:
                lgroup = field.create_group("labels", attributes={"ome": {"version": "0.5", "labels": [label_name]}})
                limage = lgroup.create_group(label_name, attributes=_label_attrs(f"{w}/{s}/{label_name}", spacing))
                targets.append(limage.create_array("0", shape=(1, n_z, n_y, n_x), chunks=(1, n_z, n_y, n_x),
                                                   dtype=np.int32, dimension_names=("c", "z", "y", "x"),
                                                   fill_value=0))
                sources.append(lab[wi, s][None])
    plate_attrs = _plate_attrs(image, plate, rows, columns, plate_wells)
    stored = da.store(sources, targets, lock=False, compute=False)

    def finish(_: Any) -> str:
        # Written last: until here the store has no plate metadata and does not open as a plate.
        if platemap is not None:
            platemap.to_csv(path / PLATEMAP_FILE, index=False)
        root.update_attributes(plate_attrs)
        return str(path)

    task = dask.delayed(finish, pure=False)(stored)
    return _run(task, progress) if compute else task


def _plate_attrs(image: xr.DataArray, plate: str, rows: list, columns: list, plate_wells: list[dict]) -> dict:
    """The plate group's OME 0.5 ``plate`` metadata plus the image's other JSON-able attrs."""
    attrs: dict[str, Any] = {"ome": {"version": "0.5", "plate": {
        "version": "0.5", "name": plate, "rows": [{"name": r} for r in rows], "columns": [{"name": str(c)} for c in columns],
        "wells": plate_wells, "field_count": int(image.sizes["site"]),
    }}}
    extra = _json_safe({k: v for k, v in image.attrs.items() if k not in ("plate", "spacing_zyx_um")})
    if extra:
        attrs["gradcamo_dask"] = extra
    return attrs


def _run(task: Any, progress: bool) -> Any:
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return task.compute()
    return task.compute()
