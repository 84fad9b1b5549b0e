"""Reporting: a run's report (report.json and report.md), plots and Grad-CAM."""
