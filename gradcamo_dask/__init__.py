"""gradcamo-dask: Grad-CAMO audits of deep single-cell profiles at plate scale.

Public names are re-exported here and imported lazily (PEP 562), so that
``import gradcamo_dask`` stays cheap: torch, cellpose and friends load only when
a name that needs them is first used (this matters for the command line and for
Dask workers, which import the package once per process).
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "open_plate": "plate",
    "open_labels": "plate",
    "write_plate": "plate",
    "read_platemap": "plate",
    "attach_platemap": "plate",
    "select_channels": "plate",
    "check_labels": "plate",
    "labels_like": "plate",
    "SyntheticPlate": "synthetic",
    "synthetic_plate": "synthetic",
    "site_cells": "cells",
    "cell_table": "cells",
    "crop_site": "cells",
    "extract_crops": "cells",
    "rescale_crops": "cells",
    "fit_normalization": "cells",
    "normalize_crops": "cells",
    "CAMResult": "explain",
    "Explanation": "explain",
    "GradCAM": "explain",
    "explain": "explain",
    "gradcamo_lowres": "gradcamo",
    "gradcamo_score": "gradcamo",
    "gradcamo_summary": "gradcamo",
    "interpolation_matrix": "gradcamo",
    "upsample_cam": "gradcamo",
    "Bundle": "bundles",
    "BundleConfig": "bundles",
    "load_bundle": "bundles",
    "save_bundle": "bundles",
    "default_layer": "layers",
    "layer_grids": "layers",
    "EfficientNet3D": "models",
    "convert_efficientnet_pytorch_3d": "models",
    "efficientnet3d": "models",
    "from_efficientnet_pytorch_3d": "models",
    "segment": "segment",
    "segment_site": "segment",
    "make_segmenter": "segmenters",
    "Segmenter": "segmenters",
    "resolve_cellpose_weights": "cellpose_adapter",
    "Augmentation": "augment",
    "augment_batch": "augment",
    "gradcamo_loss": "regularize",
    "train": "train",
    "check_cellpose_weights": "cellpose_adapter",
    "classic_feature_names": "classic",
    "classic_features": "classic",
    "site_classic_features": "classic",
    "Whitening": "whitening",
    "apply_whitening": "whitening",
    "fit_whitening": "whitening",
    "cellprofiler_table": "export",
    "to_cellprofiler_table": "export",
    "filter_profiles": "qc",
    "flag_profiles": "qc",
    "gradcamo_counts": "qc",
    "layer_sweep": "qc",
    "rank_layers": "qc",
    "summarize_gradcamo": "qc",
    "load_profiles": "report",
    "write_report": "report",
    "slurm_cluster": "slurm",
    "load_slurm_config": "slurm",
    "check_writable": "storage",
    "normalize_output_url": "storage",
    "tls_security": "tls",
    "open_tls_client": "tls",
    "score_plate": "pipeline",
    "write_profiles": "pipeline",
    "open_profiles": "pipeline",
    "describe_store": "pipeline",
    "done_sites": "pipeline",
    "connect": "cluster",
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


class _Package(types.ModuleType):
    """The package module; keeps public functions named like their module.

    Importing a submodule binds it on the package, so the first import of
    ``gradcamo_dask.explain`` (the module) would hide ``gradcamo_dask.explain``
    (the function). Such names keep the function; the module stays reachable as
    ``sys.modules["gradcamo_dask.explain"]`` and through ``from gradcamo_dask.explain
    import ...``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
