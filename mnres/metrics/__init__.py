"""Metrics, pure numpy/scipy: cells (`cells`), patients (`slides`), K classes (`multiclass`),
temperature scaling and operating points (`calibration`), each slide's prevalence
(`slide_prior`), proportion intervals (`intervals`), a verdict per slide (`verdicts`) and its
rule fitted on validation slides (`verdict_fitting`).

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
from mnres.metrics.intervals import rogan_gladen, rogan_gladen_interval, wilson_interval
from mnres.metrics.slides import choose_fraction_threshold, patient_metrics, slide_table
from mnres.metrics.verdict_fitting import (
    choose_binomial_rule,
    choose_count_rule,
    choose_fraction_rule,
    crop_sensitivity,
    false_positive_rate,
    fit_rule,
    rule_record,
)
from mnres.metrics.verdicts import (
    VERDICTS,
    VerdictRule,
    detection_probability,
    false_alarm_rate,
    slide_verdicts,
)

__all__ = [
    "COLLAPSE_SHARE",
    "COLLAPSE_STD",
    "VERDICTS",
    "VerdictRule",
    "binary_metrics",
    "binned_calibration_error",
    "calibration_bins",
    "choose_binomial_rule",
    "choose_count_rule",
    "choose_fraction_rule",
    "choose_fraction_threshold",
    "crop_sensitivity",
    "detection_probability",
    "expected_calibration_error",
    "false_alarm_rate",
    "false_positive_rate",
    "fit_rule",
    "output_collapse",
    "patient_metrics",
    "reliability_bins",
    "roc_curve",
    "rule_record",
    "rogan_gladen",
    "rogan_gladen_interval",
    "sensitivity_at_specificity",
    "slide_table",
    "slide_verdicts",
    "wilson_interval",
]
