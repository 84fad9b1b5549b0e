"""Peak memory of an evaluation: batches fetched one at a time against queued, by allocator.

  python -m experiments.eval_memory          # 96 px, alpha 0.75, 8 views: 512 and 1,536 crops
  python -m experiments.eval_memory --image_size=64 --alpha=0.35 --crops=2048

Each measurement is a fresh process (the kept heap has to be in place before JAX's first
computation, and a process's peak cannot be reset): the default recipe's network at the given
size and width with random weights, random crops, `eval_batch_size` crops a batch, its test-time
views. "one at a time" is `mnres.training.steps.evaluate`; "queued" runs every batch before it
fetches any output (the loop `evaluate` had before mnres 0.2.0's fix). The allocator is the
experiments' (freed memory kept, `mnres.host_memory.keep_freed_memory`) or glibc's default.
Prints each process's peak resident memory (`ru_maxrss`) and its evaluation's seconds;
docs/performance.md ("Keeping freed memory") quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LOOPS = ("one_at_a_time", "queued")
ALLOCATORS = ("kept", "default")


def _worker(args: dict) -> dict:
    """One evaluation in this process; its peak resident memory and seconds."""
    if args["allocator"] == "kept":
        from mnres import host_memory

        host_memory.keep_freed_memory()
    import resource

    import jax
    import numpy as np
    import optax

    from mnres import data, models
    from mnres.config import schema
    from mnres.training import steps

    config = schema.default_config()
    config.data.image_size, config.model.alpha = args["image_size"], args["alpha"]
    size, n = args["image_size"], args["crops"]
    model = models.from_config(config.model)
    mesh = steps.make_mesh()
    state = steps.init_state(model, optax.identity(), size, 0, mesh)
    rng = np.random.default_rng(0)
    split = data.Split(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        rng.integers(0, 2, n).astype(np.int32),
        np.full(n, ""),
        np.array([str(i) for i in range(n)]),
    )
    eval_step = steps.make_eval_step(model, mesh, tta=bool(config.test_time_augmentation))
    batch = args.get("batch", config.eval_batch_size)
    start = time.perf_counter()
    if args["loop"] == "one_at_a_time":
        out = steps.evaluate(eval_step, state, split, batch, mesh)
        seen = len(out["labels"])
    else:
        queued = [
            eval_step(state, steps.shard_batch(b, mesh)) for b in data.eval_batches(split, batch)
        ]
        seen = int(sum(np.sum(o["mask"]) for o in jax.device_get(queued)))
    seconds = time.perf_counter() - start
    assert seen == n, (seen, n)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {**args, "peak_gb": peak_kb * 1024 / 1e9, "seconds": seconds}


def _choices(allowed):
    """An argparse type: a comma-separated subset of `allowed`, refused with the choices."""

    def parse(text: str) -> list[str]:
        picked = text.split(",")  # never empty: "" splits to [""], which is refused below
        if any(p not in allowed for p in picked):
            raise argparse.ArgumentTypeError(f"{text!r}: pick from {', '.join(allowed)}")
        return picked

    return parse


def _crop_counts(text: str) -> list[int]:
    """An argparse type: comma-separated positive crop counts."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated positive integers, e.g. 512,1536"
        )
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--crops", type=_crop_counts, default="512,1536", help="e.g. 512,1536")
    parser.add_argument("--loops", type=_choices(LOOPS), default=",".join(LOOPS))
    parser.add_argument("--allocators", type=_choices(ALLOCATORS), default=",".join(ALLOCATORS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    from mnres import provenance

    print(
        f"{provenance.cpu().get('model')}, {os.cpu_count()} cores; "
        + ", ".join(f"{k} {v}" for k, v in provenance.versions().items())
    )
    print(f"{args.image_size} px, alpha {args.alpha}, random weights and crops")
    print(f"{'allocator':<10}{'loop':<15}{'crops':>7}{'peak GB':>10}{'seconds':>10}")
    for allocator in args.allocators:
        for loop in args.loops:
            for crops in args.crops:
                job = {"allocator": allocator, "loop": loop, "crops": crops,
                       "image_size": args.image_size, "alpha": args.alpha}  # fmt: skip
                done = subprocess.run(
                    [sys.executable, "-m", __spec__.name, "--worker", json.dumps(job)],
                    capture_output=True, text=True,
                )  # fmt: skip
                if done.returncode:
                    print(f"{allocator:<10}{loop:<15}{crops:>7}  failed (exit {done.returncode}):")
                    print(done.stderr[-2000:])
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{allocator:<10}{loop:<15}{crops:>7}{r['peak_gb']:>10.2f}{r['seconds']:>10.1f}"
                )


if __name__ == "__main__":
    main()
