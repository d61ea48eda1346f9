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
    "read_platemap": "io.platemap",
    "attach_platemap": "io.platemap",
    "select_channels": "io.layout",
    "check_labels": "io.layout",
    "labels_like": "io.layout",
    "SyntheticPlate": "io.synthetic",
    "synthetic_plate": "io.synthetic",
    "site_cells": "cells",
    "cell_table": "cells",
    "crop_site": "cells",
    "extract_crops": "cells",
    "rescale_crops": "cells",
    "fit_normalization": "cells",
    "normalize_crops": "cells",
    "CAMResult": "engine.explain",
    "Explanation": "engine.explain",
    "GradCAM": "engine.explain",
    "explain": "engine.explain",
    "gradcamo_lowres": "engine.gradcamo",
    "gradcamo_score": "engine.gradcamo",
    "interpolation_matrix": "engine.gradcamo",
    "upsample_cam": "engine.gradcamo",
    "Bundle": "engine.bundles",
    "BundleConfig": "engine.bundles",
    "load_bundle": "engine.bundles",
    "save_bundle": "engine.bundles",
    "default_layer": "engine.layers",
    "layer_grids": "engine.layers",
    "EfficientNet3D": "engine.models",
    "convert_efficientnet_pytorch_3d": "engine.models",
    "efficientnet3d": "engine.models",
    "from_efficientnet_pytorch_3d": "engine.models",
    "segment_plate": "segment.plate",
    "segment_site": "segment.plate",
    "make_segmenter": "segment.segmenters",
    "Segmenter": "segment.segmenters",
    "resolve_cellpose_weights": "segment.cellpose_adapter",
    "Augmentation": "engine.augment",
    "augment_batch": "engine.augment",
    "gradcamo_loss": "engine.regularize",
    "train": "jobs.train",
    "check_cellpose_weights": "segment.cellpose_adapter",
    "classic_feature_names": "profiles.classic",
    "classic_features": "profiles.classic",
    "site_classic_features": "profiles.classic",
    "Whitening": "profiles.whitening",
    "apply_whitening": "profiles.whitening",
    "fit_whitening": "profiles.whitening",
    "cellprofiler_table": "profiles.export",
    "to_cellprofiler_table": "profiles.export",
    "write_cellprofiler_csv": "profiles.cellprofiler_csv",
    "cytotable_options": "profiles.cellprofiler_csv",
    "install_duckdb_extensions": "profiles.cellprofiler_csv",
    "label_outliers_with_gradcamo": "profiles.outliers",
    "filter_profiles": "profiles.qc",
    "flag_profiles": "profiles.qc",
    "gradcamo_counts": "profiles.qc",
    "layer_sweep": "profiles.qc",
    "rank_layers": "profiles.qc",
    "summarize_gradcamo": "profiles.qc",
    "write_report": "profiles.report",
    "slurm_cluster": "jobs.slurm",
    "load_slurm_config": "jobs.slurm",
    "check_writable": "io.storage",
    "normalize_output_url": "io.storage",
    "tls_security": "jobs.tls",
    "open_tls_client": "jobs.tls",
    "score_plate": "jobs.score",
    "write_profiles": "profiles.store",
    "open_profiles": "profiles.store",
    "describe_profiles": "profiles.store",
    "done_sites": "profiles.store",
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

