"""gradcamo-dask: Grad-CAMO audits of deep single-cell profiles at plate scale.

Public names are re-exported here and imported lazily (PEP 562), so that
``import gradcamo_dask`` stays cheap: torch, cellpose and friends load only when
a name that needs them is first used (this matters for the command line and for
Dask workers, which import the package once per process).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (one line per name; keep sorted by module)
_EXPORTS: dict[str, str] = {
    "GradcamoError": "errors",
    "PlateLayoutError": "errors",
    "LabelsError": "errors",
    "MetadataError": "errors",
    "BundleMismatchError": "errors",
    "InputError": "errors",
    "WeightsNotFoundError": "errors",
    "OutputStoreError": "errors",
    "ClusterError": "errors",
    "TrainingError": "errors",
    "WeightsFormatError": "errors",
    "open_plate": "io.plate",
    "open_labels": "io.plate",
    "write_plate": "io.plate",
    "open_platemap": "io.platemap",
    "write_labels": "io.plate",
    "describe_labels": "io.plate",
    "synthetic_plate": "io.synthetic",
    "cell_truth": "io.synthetic",
    "population_labels": "io.synthetic",
    "cell_table": "cells",
    "extract_crops": "cells",
    "explain": "engine.explain",
    "gradcamo_score": "engine.gradcamo",
    "gradcamo_ceiling": "engine.gradcamo",
    "open_bundle": "engine.bundles",
    "write_bundle": "engine.bundles",
    "layer_grids": "engine.layers",
    "efficientnet3d": "engine.models",
    "segment_plate": "segment.plate",
    "segment_site": "segment.plate",
    "Segmenter": "segment.segmenters",
    "CellposeSegmenter": "segment.segmenters",
    "WatershedSegmenter": "segment.segmenters",
    "train": "jobs.train",
    "Recipe": "jobs.recipe",
    "Split": "jobs.recipe",
    "classic_features": "profiles.classic",
    "apply_whitening": "profiles.whitening",
    "fit_whitening": "profiles.whitening",
    "cellprofiler_table": "profiles.export",
    "write_cellprofiler_csv": "profiles.cellprofiler_csv",
    "to_cellprofiler_table": "profiles.export",
    "cytotable_options": "profiles.cellprofiler_csv",
    "install_duckdb_extensions": "profiles.cellprofiler_csv",
    "label_outliers_with_gradcamo": "profiles.outliers",
    "filter_profiles": "profiles.qc",
    "layer_sweep": "jobs.sweep",
    "rank_layers": "profiles.qc",
    "summarize_gradcamo": "profiles.qc",
    "write_report": "profiles.report",
    "score_plate": "jobs.score",
    "write_profiles": "profiles.store",
    "open_profiles": "profiles.store",
    "describe_profiles": "profiles.store",
    "connect": "jobs.cluster",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradcamo_dask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gradcamo_dask.{module}"), name)
    globals()[name] = value
    return value



def __dir__() -> list[str]:
    return __all__

