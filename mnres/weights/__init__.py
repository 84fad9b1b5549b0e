"""Weights: the shipped malaria model, Keras ImageNet weights and warm starts."""
