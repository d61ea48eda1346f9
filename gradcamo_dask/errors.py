"""Error types. Every message says what was wrong and what to do about it.

All errors derive from :class:`GradcamoError` and from the matching built-in
type, so ``except ValueError`` keeps working for callers that do not know ours.
"""

from __future__ import annotations


class GradcamoError(Exception):
    """Base class of every error raised on purpose by gradcamo-dask."""


class PlateLayoutError(GradcamoError, ValueError):
    """A plate's wells, sites, channels or shapes do not fit together or do not fit the
    platemap or the model. Name the plate, well and site."""


class LabelsError(GradcamoError, ValueError):
    """Labels are missing, of the wrong type, or do not match the image."""


class MetadataError(GradcamoError, ValueError):
    """Malformed OME-Zarr (or other) metadata; the message names the key and the file."""


class BundleMismatchError(GradcamoError, ValueError):
    """A model bundle does not fit the data (channels, classes, grids); names both sides."""


class InputError(GradcamoError, ValueError):
    """Bad arrays handed to the engine: wrong shapes, NaN or inf, unknown layers."""


class DimensionalityError(BundleMismatchError, InputError):
    """A 3D model or bundle met 2D data, or the reverse; names both sides."""


class WeightsNotFoundError(GradcamoError, FileNotFoundError):
    """Model weights are not on disk and cannot be downloaded; says where to put them."""


class OutputStoreError(GradcamoError, RuntimeError):
    """An output store that cannot be written or belongs to another run."""


class ClusterError(GradcamoError, ConnectionError):
    """A Dask cluster that cannot be reached or started."""


class TrainingError(GradcamoError, ValueError):
    """Training cannot start or resume as asked (splits, classes, checkpoints)."""


class WeightsFormatError(GradcamoError, ValueError):
    """A weights file exists but cannot be used: not a model of the expected kind, or made for
    another major version of the library that runs it; names the file and what it holds."""
