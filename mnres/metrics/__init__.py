"""Metrics, pure numpy: cells (`cells`), patients (`slides`), K classes (`multiclass`), temperature
scaling and operating points (`calibration`), each slide's prevalence (`slide_prior`).

The binary cell and patient metrics are the package's own names: `mnres.metrics.binary_metrics`.
"""

from mnres.metrics.cells import (
    COLLAPSE_SHARE,
    COLLAPSE_STD,
    binary_metrics,
    binned_calibration_error,
    calibration_bins,
    expected_calibration_error,
    output_collapse,
    reliability_bins,
    roc_curve,
    sensitivity_at_specificity,
)
from mnres.metrics.slides import choose_fraction_threshold, patient_metrics, slide_table

__all__ = [
    "COLLAPSE_SHARE",
    "COLLAPSE_STD",
    "binary_metrics",
    "binned_calibration_error",
    "calibration_bins",
    "choose_fraction_threshold",
    "expected_calibration_error",
    "output_collapse",
    "patient_metrics",
    "reliability_bins",
    "roc_curve",
    "sensitivity_at_specificity",
    "slide_table",
]
