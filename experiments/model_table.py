"""Prints the model table of docs/models.md: Keras-convention parameter counts computed by mnres.

python -m experiments.model_table
"""

from mnres import models
from mnres.models import params

ROWS = [
    ("paper", {}, "seed network (paper), frozen through conv_pw_9"),
    ("paper", {"freeze_through": None}, "seed network, every layer trained"),
    ("mobilenet_v1", {}, "MobileNet v1, 1000-class top"),
    *[
        ("mobilenet_v1", {"alpha": a, "include_top": False}, f"MobileNet v1 a={a}, no top")
        for a in (0.25, 0.5, 0.75, 1.0)
    ],
    ("mobilenet_v1_residual", {"num_classes": 2}, "MobileNet v1 + identity skips, 2 classes"),
    ("mobilenet_v2", {}, "MobileNetV2, 1000-class top"),
    *[
        ("mobilenet_v2", {"alpha": a, "include_top": False}, f"MobileNetV2 a={a}, no top")
        for a in (1.0, 0.75, 0.5, 0.35)
    ],
    ("mobilenet_v2", {"alpha": 0.35, "num_classes": 2}, "MobileNetV2 a=0.35, 2 classes"),
]


def main():
    print("| model | `create_model` call | total | trainable | non-trainable | BN statistics |")
    print("|---|---|---:|---:|---:|---:|")
    for name, overrides, title in ROWS:
        c = params.count_params(models.create_model(name, **overrides))
        args = "".join(f", {k}={v!r}" for k, v in overrides.items())
        print(
            f"| {title} | `create_model({name!r}{args})` | {c.total:,} | {c.trainable:,} "
            f"| {c.non_trainable:,} | {c.batch_stats:,} |"
        )


if __name__ == "__main__":
    main()
