"""Experiments on mnres: `python -m experiments.malaria --config=experiments/configs/NAME.py`."""
