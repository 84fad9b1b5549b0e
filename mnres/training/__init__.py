"""Training: the train state and compiled steps, optimizers, checkpoints and the fit loop."""
