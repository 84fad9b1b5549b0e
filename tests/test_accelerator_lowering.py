"""The train and eval steps of the default and TPU configs, lowered for TPU and GPU from a CPU.

Nothing here compiles for or runs on an accelerator: this lowers the steps the training code
builds (`steps.make_mesh`, `steps.init_state`, `steps.make_train_step`,
`steps.make_eval_step`) over a 4-device mesh, with the conv formulation 'auto' picks on the
target platform, to StableHLO for 'tpu' and 'cuda', and checks the text: the batch sharded over
the 4 devices and the state replicated, the compute dtype of the config, every depthwise conv a
grouped convolution, and nothing that needs the host: no custom call of XLA's CPU runtime
(LAPACK, ducc) and no host callback. It proves that the programs lower; XLA's TPU and GPU
compilers, memory and numerics are not checked (docs/training.md, "Checked for TPU and GPU
from a CPU").

The lowering runs in subprocesses (this file run as a script) with 4 fake CPU devices
(`--xla_force_host_platform_device_count=4`), as the device count is fixed when JAX starts.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.configs import default, tpu

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"default": default, "tpu": tpu}
PLATFORMS = ("tpu", "cuda")  # names as `Traced.lower(lowering_platforms=...)` takes them
DEVICES = 4
IMAGE_SIZE = 32  # small programs, the configs' formulation, dtype and sharding
BATCH_SIZE = 8  # 2 examples per device
DTYPES = {"float32": "f32", "bfloat16": "bf16"}
# Custom calls an accelerator program may hold: GSPMD's sharding annotations.
ALLOWED_CUSTOM_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})
# Targets of XLA's CPU runtime (LAPACK, ducc FFTs) and host callbacks into this Python process:
# named in the failure message.
HOST_CUSTOM_CALL = re.compile(r"cpu|lapack|ducc|callback", re.IGNORECASE)


def small_config(name: str):
    """Config `name`, shrunk to 32 px and batches of 8; model, dtype and optimizer as they are."""
    config = CONFIGS[name].get_config()
    config.data.image_size = IMAGE_SIZE
    config.batch_size = config.eval_batch_size = BATCH_SIZE
    return config


# -- the check, shared by the programs and the controls ---------------------------------------


def _custom_calls(text: str) -> list[str]:
    """Every custom call target, in the pretty (`@name`) and the generic form."""
    return re.findall(r"custom_call @([\w.$-]+)", text) + re.findall(
        r'call_target_name = "([^"]+)"', text
    )


def _main_arguments(text: str) -> list[tuple[str, str]]:
    """(type, sharding) of every argument of the entry function `main`."""
    line = next(line for line in text.splitlines() if "func.func public @main(" in line)
    signature = line.split("@main(", 1)[1].split(") -> ", 1)[0]
    arguments = []
    for chunk in re.split(r"%arg\d+: ", signature)[1:]:
        shardy = re.search(r"sdy\.sharding<@\w+, (\[.*?\])>", chunk)
        gspmd = re.search(r'mhlo\.sharding = "([^"]*)"', chunk)
        sharding = shardy.group(1) if shardy else gspmd.group(1) if gspmd else ""
        arguments.append((chunk.split(" ", 1)[0].rstrip(","), sharding))
    return arguments


def _is_batch_sharded(sharding: str, devices: int) -> bool:
    """The leading (batch) axis split over the `devices` of the 'data' axis, nothing else."""
    return bool(
        re.fullmatch(r'\[\{"data"\}(, \{\})*\]', sharding)  # Shardy
        or re.match(rf"\{{devices=\[{devices}(,1)*\]", sharding)  # GSPMD
    )


def _is_replicated(sharding: str) -> bool:
    return bool(re.fullmatch(r"\[(\{\}(, )?)*\]", sharding)) or sharding == "{replicated}"


def check_accelerator_program(
    lowered: dict,
    *,
    devices: int,
    batch_arguments: int,
    dtype: str,
    feature_grouped: int,
    batch_grouped: int = 0,
) -> dict:
    """Raises AssertionError unless `lowered` is a program an accelerator can be given.

    Args:
      lowered: {'platform', and 'text' (the StableHLO) or 'error' (why lowering failed)}.
      devices: the mesh size the batch is sharded over.
      batch_arguments: how many arguments of `main` are the batch (the last ones).
      dtype: 'bf16' or 'f32', the element type of every convolution; with 'f32' no bf16 at
        all, with 'bf16' none in the arguments (parameters and BatchNorm stay float32).
      feature_grouped: convolutions with feature_group_count > 1 (depthwise forward, and their
        input gradients in a train step).
      batch_grouped: convolutions with batch_group_count > 1 (depthwise kernel gradients).

    Returns:
      What was found: counts of convolutions and custom calls, the mesh and the shardings.
    """
    platform = lowered["platform"]
    if "error" in lowered:
        raise AssertionError(f"does not lower for {platform}: {lowered['error']}")
    text = lowered["text"]
    calls = _custom_calls(text)
    host = sorted({c for c in calls if HOST_CUSTOM_CALL.search(c)})
    assert not host, f"host or CPU-only custom calls in a program for {platform}: {host}"
    unknown = sorted(set(calls) - ALLOWED_CUSTOM_CALLS)
    assert not unknown, f"custom calls not known to run on {platform}: {unknown}"
    # A TPU reaches a host callback through send/recv to the host.
    assert "is_host_transfer = true" not in text, f"host transfers in a program for {platform}"

    assert re.search(rf"mhlo\.num_partitions = {devices} ", text), f"not {devices} partitions"
    mesh = re.search(r"sdy\.mesh @\w+ = <(\[.*?\])>", text)
    assert mesh is None or mesh.group(1) == f'["data"={devices}]', mesh.group(1)
    arguments = _main_arguments(text)
    state, batch = arguments[:-batch_arguments], arguments[-batch_arguments:]
    assert all(_is_batch_sharded(s, devices) for _, s in batch), f"batch sharding: {batch}"
    bad = [a for a in state if not _is_replicated(a[1])]
    assert not bad, f"{len(bad)} state arguments not replicated, e.g. {bad[:3]}"

    convs = re.findall(
        r"stablehlo\.convolution\(.*\{batch_group_count = (\d+) : i64, "
        r"feature_group_count = (\d+) : i64.* -> tensor<[^>]*x(\w+)>",
        text,
    )
    counts = {
        "convolutions": len(convs),
        "feature_grouped": sum(int(f) > 1 for _, f, _ in convs),
        "batch_grouped": sum(int(b) > 1 for b, _, _ in convs),
    }
    assert counts["feature_grouped"] == feature_grouped, (counts, feature_grouped)
    assert counts["batch_grouped"] == batch_grouped, (counts, batch_grouped)
    types = sorted({t for _, _, t in convs})
    assert types == [dtype], f"convolutions in {types}, expected {dtype}"
    if dtype == "f32":
        assert "bf16" not in text, "bfloat16 in a float32 program"
    else:
        assert not any("bf16" in t for t, _ in arguments), "bfloat16 parameters or state"
    return {
        **counts,
        "custom_calls": sorted(set(calls)),
        "mesh": mesh.group(1) if mesh else None,
        "batch_sharding": batch[0][1],
        "state_arguments": len(state),
    }


# -- the lowering, in a subprocess with 4 CPU devices -------------------------------------------


def _lower(traced, platform: str) -> dict:
    """`traced` (`jax.jit(f).trace(*args)`) lowered for `platform`: its text, or why not."""
    try:
        text = traced.lower(lowering_platforms=(platform,)).as_text()
    except Exception as e:  # noqa: BLE001 - the check reports any failure to lower
        return {"platform": platform, "error": f"{type(e).__name__}: {e}"}
    return {"platform": platform, "text": text}


def lower_steps(name: str, outdir: str) -> None:
    """Writes `{name}_{step}_{platform}.mlir` (or `.error`) for the train and eval steps.

    The model is built for the platform lowered for (`from_config(..., platform=...)`), so
    'auto' picks that platform's formulation. The 'tpu' job adds the controls.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mnres import config as config_lib
    from mnres import models
    from mnres.models import params as params_lib
    from mnres.training import optim, steps

    assert jax.device_count() == DEVICES, jax.devices()
    config = small_config(name)
    config_lib.validate(config)
    mesh = steps.make_mesh()
    size = config.data.image_size

    models_for = {p: models.from_config(config.model, platform=p) for p in (*PLATFORMS, "cpu")}
    # The optimizer and the state's shapes, as the training loop makes them, through
    # init_state itself (nothing is computed on the CPU). The formulations share one
    # parameter tree, so they serve every platform's model.
    shapes = params_lib.abstract_variables(models_for["tpu"], (1, size, size, 3))
    tx, _ = optim.create_optimizer(config.optimizer, models_for["tpu"], shapes["params"], 10, 1)
    ema = config.get("ema_decay") is not None
    state = jax.eval_shape(
        lambda: steps.init_state(models_for["tpu"], tx, size, config.seed, mesh, ema=ema)
    )

    def batch(mesh, *, mask):
        sharded = NamedSharding(mesh, P("data"))
        b = {
            "image": jax.ShapeDtypeStruct((BATCH_SIZE, size, size, 3), jnp.uint8, sharding=sharded),
            "label": jax.ShapeDtypeStruct((BATCH_SIZE,), jnp.int32, sharding=sharded),
        }
        if mask:
            b["mask"] = jax.ShapeDtypeStruct((BATCH_SIZE,), jnp.bool_, sharding=sharded)
        return b

    def save(stem, lowered):
        kind = "mlir" if "text" in lowered else "error"
        Path(outdir, f"{stem}.{kind}").write_text(lowered.get("text") or lowered["error"])

    tta = bool(config.get("test_time_augmentation", False))  # as the final evaluation
    traced = {}  # by formulation: TPU and GPU both get 'grouped', traced once
    for platform in PLATFORMS:
        model = models_for[platform]
        if model.conv_formulation not in traced:
            train_step = steps.make_train_step(
                model,
                tx,
                config.data,
                mesh,
                label_smoothing=config.get("label_smoothing", 0.0),
                ema_decay=config.get("ema_decay"),
            )
            eval_step = steps.make_eval_step(model, mesh, tta=tta)
            traced[model.conv_formulation] = {
                "train": train_step.trace(state, batch(mesh, mask=False)),
                "eval": eval_step.trace(state, batch(mesh, mask=True)),
            }
        for step, trace in traced[model.conv_formulation].items():
            save(f"{name}_{step}_{platform}", _lower(trace, platform))
    if name != "tpu":
        return

    # Controls: the TPU config's eval step, changed in one way each, must fail the check.
    model = models_for["tpu"]
    eval_step = steps.make_eval_step(model, mesh, tta=tta)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    args = (state, batch(mesh, mask=True))

    def with_host_callback(state, batch):
        out = eval_step(state, batch)
        jax.debug.callback(lambda prob: None, out["prob"])
        return out

    def with_pure_callback(state, batch):
        out = eval_step(state, batch)
        shape = jax.ShapeDtypeStruct(out["prob"].shape, out["prob"].dtype)
        return {**out, "prob": jax.pure_callback(lambda p: p, shape, out["prob"])}

    def with_lapack(state, batch):
        out = eval_step(state, batch)
        shape = jax.ShapeDtypeStruct(out["prob"].shape, out["prob"].dtype)
        return {**out, "prob": jax.ffi.ffi_call("lapack_sgetrf_ffi", shape)(out["prob"])}

    for label, fn in (
        ("debug_callback", with_host_callback),
        ("pure_callback", with_pure_callback),
        ("lapack", with_lapack),
    ):
        jitted = jax.jit(fn, in_shardings=(replicated, sharded), out_shardings=replicated)
        trace = jitted.trace(*args)
        for platform in (*PLATFORMS, "cpu"):
            save(f"control_{label}_{platform}", _lower(trace, platform))
    # 'auto' resolved for a CPU: the shifted formulation, no grouped convolution.
    shifted = steps.make_eval_step(models_for["cpu"], mesh, tta=tta)
    save("control_shifted_tpu", _lower(shifted.trace(*args), "tpu"))
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    one_device = steps.make_eval_step(model, one, tta=tta).trace(state, batch(one, mask=True))
    save("control_one_device_tpu", _lower(one_device, "tpu"))


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """Lowers both configs, in parallel subprocesses; returns `load(stem) -> lowered dict`."""
    outdir = tmp_path_factory.mktemp("lowered")
    environ = {
        **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
    }
    jobs = {
        name: subprocess.Popen(
            [sys.executable, __file__, name, str(outdir)],
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in CONFIGS
    }
    for name, job in jobs.items():
        _, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, f"lowering {name} failed:\n{stderr[-4000:]}"

    def load(stem: str) -> dict:
        platform = stem.rsplit("_", 1)[1]
        found = {p.suffix: p for p in outdir.glob(f"{stem}.*")}
        assert found, f"{stem} was not lowered"
        if ".error" in found:
            return {"platform": platform, "error": found[".error"].read_text()}
        return {"platform": platform, "text": found[".mlir"].read_text()}

    return load


def _depthwise_layers(name: str) -> int:
    from mnres import models

    return sum(
        n.endswith("depthwise") for n in models.from_config(small_config(name).model).layer_names()
    )


def _expected(name: str, step: str) -> dict:
    config = small_config(name)
    depthwise = _depthwise_layers(name)
    return {
        "devices": DEVICES,
        "batch_arguments": 2 if step == "train" else 3,
        "dtype": DTYPES[config.model.dtype],
        # A train step also has each depthwise conv's input and kernel gradients.
        "feature_grouped": depthwise * (2 if step == "train" else 1),
        "batch_grouped": depthwise if step == "train" else 0,
    }


@pytest.mark.parametrize(
    "formulation, platform, resolved",
    [
        ("auto", "tpu", "grouped"),
        ("auto", "cuda", "grouped"),
        ("auto", "gpu", "grouped"),
        ("auto", "cpu", "shifted"),
        ("shifted", "tpu", "shifted"),
        ("grouped", "cpu", "grouped"),
    ],
)
def test_auto_resolves_for_a_named_platform(formulation, platform, resolved):
    from mnres.models import from_config
    from mnres.models.layers import resolve_conv_formulation

    assert resolve_conv_formulation(formulation, platform) == resolved
    model_config = small_config("default").model
    model_config.conv_formulation = formulation
    assert from_config(model_config, platform=platform).conv_formulation == resolved
    assert from_config(model_config).conv_formulation == formulation  # resolved when traced


def test_unknown_platform_is_refused():
    from mnres.models.layers import resolve_conv_formulation

    with pytest.raises(ValueError, match="platform must be one of"):
        resolve_conv_formulation("auto", "TPU")


def test_tpu_config_is_for_tpu():
    assert tpu.get_config().platform == "tpu"
    assert tpu.get_config().model.dtype == "bfloat16"
    assert _depthwise_layers("tpu") == 17  # MobileNetV2


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("step", ["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_lower_for_accelerator(lowered, name, step, platform):
    found = check_accelerator_program(lowered(f"{name}_{step}_{platform}"), **_expected(name, step))
    print(name, step, platform, found)


@pytest.mark.parametrize("label", ["debug_callback", "pure_callback"])
def test_host_callbacks_fail_the_check(lowered, label):
    expected = _expected("tpu", "eval")
    # JAX lowers a host callback only for the platform of a device it has; were it to lower
    # one for an accelerator, the callback or its host transfers would fail the check.
    for platform in PLATFORMS:
        with pytest.raises(AssertionError, match=f"does not lower for {platform}|host"):
            check_accelerator_program(lowered(f"control_{label}_{platform}"), **expected)
    # For the CPU it lowers, to a custom call that only XLA's CPU runtime has.
    with pytest.raises(AssertionError, match="CPU-only custom calls.*xla_ffi_python_cpu_callback"):
        check_accelerator_program(lowered(f"control_{label}_cpu"), **expected)


def test_cpu_only_custom_call_fails_the_check(lowered):
    # An FFI call lowers for any platform; the text check is what catches it.
    for platform in PLATFORMS:
        with pytest.raises(AssertionError, match="CPU-only custom calls.*lapack_sgetrf_ffi"):
            check_accelerator_program(
                lowered(f"control_lapack_{platform}"), **_expected("tpu", "eval")
            )


def test_shifted_formulation_fails_the_check(lowered):
    with pytest.raises(AssertionError, match="'feature_grouped': 0"):
        check_accelerator_program(lowered("control_shifted_tpu"), **_expected("tpu", "eval"))


def test_one_device_fails_the_check(lowered):
    with pytest.raises(AssertionError, match=f"not {DEVICES} partitions"):
        check_accelerator_program(lowered("control_one_device_tpu"), **_expected("tpu", "eval"))


if __name__ == "__main__":
    lower_steps(sys.argv[1], sys.argv[2])
