"""Experiment configs: each file's `get_config(arg=None)` returns an ml_collections ConfigDict."""
