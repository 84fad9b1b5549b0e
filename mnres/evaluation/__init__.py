"""Evaluation: metrics, calibration, reports and plots, cross-validation, Grad-CAM."""
