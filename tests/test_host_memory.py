"""keep_freed_memory: XLA's CPU steps stop page-faulting their buffers in again every step."""

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mnres import host_memory

LIBRARY_MD = Path(__file__).resolve().parents[1] / "docs" / "library.md"
KEEP_CALL = "host_memory.keep_freed_memory()  # first: before JAX's first computation\n"

# A training-like step: activations of 32 MB kept for the backward pass, then freed.
SYNTHETIC_STEP = textwrap.dedent(
    """
    from mnres import host_memory
    host_memory.keep_freed_memory()  # first: before JAX's first computation
    import jax, jax.numpy as jnp

    @jax.jit
    def step(w, x):
        def loss(w):
            h = x
            for wi in w:
                h = jnp.tanh(h * wi)
            return jnp.mean(h ** 2)
        return [wi - 0.1 * gi for wi, gi in zip(w, jax.grad(loss)(w), strict=True)]

    x = jnp.full((16384, 512), 0.5)
    w = [jnp.ones(512) for _ in range(4)]
    for _ in range(10):
        w = step(w, x)
    sgd_step = lambda: step(w, x)
    """
)

# Appended to a program that defines `sgd_step`: minor page faults of each of 15 steps after
# 10 more of warm-up (the heap grows to its working size during the first steps).
MEASURE = textwrap.dedent(
    """
    import json, resource
    def faults_of_one_step():
        global variables, w
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if "variables" in globals():
            variables, _ = jax.block_until_ready(sgd_step(variables, images, labels))
        else:
            w = jax.block_until_ready(sgd_step())
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(10):
        faults_of_one_step()
    print(json.dumps([faults_of_one_step() for _ in range(15)]))
    """
)


def library_snippet() -> str:
    """The training step of docs/library.md, "Fast training steps on a CPU"."""
    text = LIBRARY_MD.read_text()
    match = re.search(r"## Fast training steps on a CPU\n.*?```python\n(.*?)```", text, re.S)
    assert match, "docs/library.md lost its fast-training snippet"
    assert KEEP_CALL in match.group(1), "the snippet no longer calls keep_freed_memory() first"
    return match.group(1)


def _median_faults_per_step(program: str, mechanism: str) -> float:
    """Median minor page faults per step of `program` run with glibc's malloc `mechanism`.

    'default': the keep_freed_memory() call taken out; 'call': the program as written;
    'environment': the call taken out, host_memory.ENVIRONMENT set instead.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["JAX_PLATFORMS"] = "cpu"
    if mechanism != "call":
        program = program.replace(KEEP_CALL, "")
    if mechanism == "environment":
        env.update(host_memory.ENVIRONMENT)
    out = subprocess.run(
        [sys.executable, "-c", program + MEASURE],
        capture_output=True, text=True, check=True, timeout=600, env=env,
    )  # fmt: skip
    faults = sorted(json.loads(out.stdout.strip().splitlines()[-1]))
    # The median step: a kept heap still grows now and then (a new high-water mark after a
    # different allocation order faults hundreds of MB in once), which one step can catch;
    # by default every step faults.
    return faults[len(faults) // 2]


@pytest.fixture(scope="module")
def default_faults():
    """Median faults per step on glibc's default allocator, per program (measured once)."""
    cache = {}

    def faults(name, program):
        if name not in cache:
            cache[name] = _median_faults_per_step(program, "default")
        return cache[name]

    return faults


# Counts page faults: other processes on the CPU change the heap's timing and the counts, so the
# comparison is a median per step and a wide ratio between two runs, not an absolute count.
@pytest.mark.timing
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only"
)
@pytest.mark.parametrize(
    "name, mechanism",
    [("library", "call"), ("library", "environment"), ("synthetic", "call")],
)
def test_kept_memory_is_reused_without_page_faults(name, mechanism, default_faults):
    program = library_snippet() if name == "library" else SYNTHETIC_STEP
    default = default_faults(name, program)
    kept = _median_faults_per_step(program, mechanism)
    # Measured on a 2-core AMD EPYC: the library step 52,707 faults (~206 MB) per step by
    # default, 0 kept; the synthetic one several 32 MB buffers (~8,000 faults each) per step.
    assert default > 5_000, default
    assert kept < 0.1 * default, (kept, default)


def test_a_late_call_warns_and_applies_the_same_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_mallopt", lambda: lambda *a: calls.append(a) or 1)
    monkeypatch.setattr(sys, "platform", "linux")
    jax.block_until_ready(jnp.zeros(1))  # JAX's backend, and XLA's threads, are running
    with pytest.warns(RuntimeWarning, match="before JAX's first computation"):
        assert host_memory.keep_freed_memory() is True
    assert calls == [(-8, 1), (-4, 0), (-1, -1)]  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD
    # Before JAX starts there is nothing to warn about.
    monkeypatch.setattr(host_memory, "_jax_backend_started", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert host_memory.keep_freed_memory() is True


def test_the_environment_form_names_the_same_settings():
    # glibc reads these when a process starts (MALLOC_*_ are its tunables' aliases).
    assert host_memory.ENVIRONMENT == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": "-1",
    }


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False
