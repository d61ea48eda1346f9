"""coSMicQC's morphology outlier labels beside the Grad-CAMO QC flags, in one per-object table.

coSMicQC (the cytomining single-cell QC package) labels a cell an outlier of a named
condition when each of the condition's features is beyond its z-score threshold, and
writes ``Metadata_cqc_<condition>_is_outlier``. Our Grad-CAMO flags share its prefix
(``Metadata_cqc_gradcamo_below_cutoff``, ``Metadata_cqc_gradcamo_undefined``), so
pycytominer's ``normalize(..., drop_cosmicqc_rows=True)`` drops cells flagged by either.
But ``cosmicqc.label_outliers`` first drops every ``Metadata_cqc_*`` column of its input:
run on our table alone, it would lose the Grad-CAMO flags. :func:`label_outliers_with_gradcamo`
runs it and puts them back.

coSMicQC's default thresholds are for 2D nuclei (``Nuclei_AreaShape_Area``,
``FormFactor``, ``Eccentricity``); :data:`CELL_THRESHOLDS_3D` are the same two ideas on
the 3D cell features we export (volume for area, solidity for form factor).

Installing: coSMicQC 1.1.2 pins ``pandas<3``, ``pyarrow<23`` and ``llvmlite==0.49`` and
pulls a notebook viewer stack (cytodataframe: IPython, ipywidgets, VTK/trame); it is not
a dependency of this package. Install it in an environment where those pins fit.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from gradcamo_dask.errors import InputError

__all__ = ["CELL_THRESHOLDS_3D", "label_outliers_with_gradcamo"]

# coSMicQC threshold sets (z-scores; negative: below the mean) on 3D cell features
CELL_THRESHOLDS_3D: dict[str, dict[str, float]] = {
    "small_and_irregular_cells": {"Cells_AreaShape_Volume": -1.0, "Cells_AreaShape_Solidity": -1.0},
    "large_and_irregular_cells": {"Cells_AreaShape_Volume": 2.0, "Cells_AreaShape_Solidity": -2.0},
}
QC_PREFIX = "Metadata_cqc_"


def label_outliers_with_gradcamo(
    table: pd.DataFrame,
    feature_thresholds: dict[str, Any] | str | None = None,
    **options: Any,
) -> pd.DataFrame:
    """coSMicQC's ``label_outliers`` on the morphology, keeping the Grad-CAMO QC flags.

    Parameters
    ----------
    table : pandas.DataFrame
        A per-object table in CellProfiler naming (:func:`~gradcamo_dask.cellprofiler_table`,
        or CytoTable's output of :func:`~gradcamo_dask.write_cellprofiler_csv`).
    feature_thresholds : dict or str, optional
        coSMicQC threshold sets (``{condition: {feature: z}}``) or a set's name in
        ``feature_thresholds_file``; default :data:`CELL_THRESHOLDS_3D`.
    **options
        Passed to ``cosmicqc.label_outliers`` (``include_threshold_scores``, ...).

    Returns
    -------
    pandas.DataFrame
        ``table`` with one ``Metadata_cqc_<condition>_is_outlier`` column per condition
        (and z-scores when asked), the Grad-CAMO flags as they were, and
        ``Metadata_cqc_any_is_outlier`` (any flag set).
    """
    try:
        import cosmicqc
    except ImportError as err:
        raise InputError("coSMicQC is not installed here: pip install coSMicQC in an environment whose pandas is < 3 "
                         "and pyarrow < 23 (its pins); it is not a dependency of gradcamo-dask") from err
    thresholds = CELL_THRESHOLDS_3D if feature_thresholds is None else feature_thresholds
    if isinstance(thresholds, dict):
        features = {f for t in thresholds.values() for f in (t if isinstance(t, dict) else {t: 0})}
        missing = sorted(f for f in features if f not in table)
        if missing:
            raise InputError(f"the table has no columns {missing} for coSMicQC's thresholds; export classic features "
                             f"(classic=True when scoring) or pass feature_thresholds= on columns it has")
    ours = [c for c in table if c.startswith(QC_PREFIX)]
    labelled = pd.DataFrame(cosmicqc.label_outliers(table, feature_thresholds=thresholds, **options))
    for column in ours:  # coSMicQC drops every Metadata_cqc_* column it did not make
        if column not in labelled:
            labelled[column] = table[column].to_numpy()
    flags = [c for c in labelled if c.startswith(QC_PREFIX) and labelled[c].dtype == bool]
    labelled["Metadata_cqc_any_is_outlier"] = labelled[flags].any(axis=1)
    return labelled
