"""How exported files compare with the model they came from: accuracy, largest probability gap
to the reference (the JAX model) and batch-1 latency, on the same crops.

`python -m mnres export RUN --evaluate` prints `compare`'s rows.
"""

from __future__ import annotations

import time

import numpy as np

from mnres.deploy.predict import Predictor, class_probabilities, probabilities


def latency_ms(predictor: Predictor, image, runs: int = 50) -> float:
    """Median wall time of one batch-1 prediction (after two warm-up calls), in ms."""
    batch = np.asarray(image, np.uint8)[None]
    for _ in range(2):
        predictor.run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.run(batch)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def compare(predictors: dict, images, labels, *, threshold: float = 0.5) -> list[dict]:
    """Accuracy, largest probability gap to the first predictor, and batch-1 latency of each.

    Args:
      predictors: {name: Predictor}; the first is the reference (the JAX model).
      images: uint8 [N, S, S, 3] crops the models never trained on.
      labels: int [N], 1 = parasitized (class indices for more than two classes, whose accuracy
        is of the most probable class).
    """
    labels = np.asarray(labels)
    rows, reference = [], None
    for name, predictor in predictors.items():
        if len(predictor.class_names) == 2:
            probs = probabilities(predictor, images)
            accuracy = float(np.mean((probs >= threshold) == (labels == 1)))
        else:
            probs = class_probabilities(predictor, images)
            accuracy = float(np.mean(np.argmax(probs, -1) == labels))
        reference = probs if reference is None else reference
        rows.append(
            {
                "model": name,
                "accuracy": accuracy,
                "max_abs_diff": float(np.max(np.abs(probs - reference), initial=0.0)),
                "latency_ms": latency_ms(predictor, images[0]),
            }
        )
    return rows
