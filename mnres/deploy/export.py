"""Export a trained classifier for phones and servers: StableHLO, TFLite and ONNX.

Every exported model is one function, uint8 RGB crops of any size -> class probabilities:

- input  uint8 [B, H, W, 3], any H and W (TFLite: B = 1; int8 TFLite: H = W = S, see
  `export_tflite`);
- inside the graph the crop is resized the way training decoded it
  (`mnres.inference.resize_like_training`), scaled by x / 127.5 - 1 and classified by
  `mnres.inference.classify`, with the 8-view test-time augmentation when the run used it;
- output float32 [B, num_classes] softmax probabilities, in the order of the run's classes
  (the sidecar's `class_names`; for the malaria model class 1 = parasitized).

So a phone app feeds camera crops directly. Export always uses the grouped-convolution
depthwise formulation (TFLite then emits DEPTHWISE_CONV_2D) and float32 compute, whatever the
training used: the parameters are the same in every formulation. Each exported file gets a
sidecar `FILE.json` (image size, classes, source run, provenance) that `mnres.deploy.predict` reads.

StableHLO is `jax.export`. TFLite goes through `jax2tf` (StableHLO inside a TF function) and
the TFLite converter (`mnres.deploy.tensorflow_logs` keeps their INFO and WARNING lines off the
console), and runs with `ai-edge-litert`; ONNX (optional) goes through `jax2onnx`
and runs with `onnxruntime`. Each is imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mnres import atomic_file, provenance, run_folder
from mnres.config.schema import MALARIA_CLASSES
from mnres.deploy import crops, tensorflow_logs
from mnres.inference import Classifier

TFLITE_INPUT_SHAPE = "(1, h, w, 3)"
STABLEHLO_INPUT_SHAPE = "(b, h, w, 3)"
# The StableHLO artifact runs on any of these (lowering needs none of the hardware).
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
# A sidecar's image_size outside these is not a crop side a model of mnres was trained at (an
# edited one decides how large every crop is decoded: 20000 took 4.25 GB for one crop).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024


def serving_function(classifier: Classifier):
    """The exported function: uint8 crops [B, H, W, 3] -> probabilities float32 [B, C].

    `Classifier.serve` of the export formulation (`Classifier.for_export`): the exported model
    classifies as the run was evaluated, test-time augmentation included.
    """
    return classifier.for_export().serve


def metadata_path(path: str) -> str:
    return path + ".json"


def _write_metadata(path: str, classifier: Classifier, **extra) -> None:
    """Writes the sidecar `path.json`: input, output, source run, format, provenance.

    'provenance' is the exporting machine's (`mnres.provenance.collect`, with the source run's
    manifest hash); 'training_provenance' the one the run's report.json recorded, when it has one.
    """
    run = classifier.metadata.get("run")
    manifest = report = None
    if run and os.path.isfile(os.path.join(run, run_folder.MANIFEST_JSON)):
        manifest = run_folder.read_manifest(run)
    if run and os.path.isfile(os.path.join(run, run_folder.REPORT_JSON)):
        report = run_folder.read_report(run)
    names = classifier.class_names
    meta = {
        "image_size": classifier.image_size,
        "class_names": list(names),
        "input": "uint8 RGB [batch, height, width, 3], any height and width",
        "output": "float32 softmax probabilities [batch, classes]; class 1 = parasitized"
        if names == MALARIA_CLASSES
        else "float32 softmax probabilities [batch, classes], in the order of class_names",
        **classifier.metadata,
        **extra,
        "provenance": provenance.collect(manifest=manifest),
        "training_provenance": (report or {}).get("provenance"),
    }
    run_folder.write_json(metadata_path(path), meta)


def read_metadata(path: str) -> dict:
    """The sidecar of an exported file; {} when there is none.

    Raises:
      ValueError: a sidecar that is not a JSON object, or whose image_size is not an integer in
        [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE].
    """
    sidecar = metadata_path(path)
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the sidecar {sidecar}: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"the sidecar {sidecar} is not a JSON object; remove it or re-export")
    size = meta.get("image_size")
    if size is not None and not (
        isinstance(size, int) and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE
    ):
        raise ValueError(
            f"the sidecar {sidecar} says image_size {size!r}, not a crop side in "
            f"[{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]; restore it (or remove it) or re-export"
        )
    return meta


def run_dataset(config):
    """The run's dataset reloaded from its config, written nowhere: the decoded-image cache its
    config.json names (`data.cache_dir`) is a path read from a run folder, left alone."""
    from mnres import data

    data_config = config.data.copy_and_resolve_references()
    with data_config.unlocked():
        data_config.cache_dir = None
    return data.load_dataset(data_config, config.seed)


def export_stablehlo(classifier: Classifier, path: str, *, platforms=STABLEHLO_PLATFORMS) -> str:
    """Serializes the serving function with `jax.export` (batch, height, width symbolic).

    Load it with `load_stablehlo`: no mnres or flax code is needed to run it.
    """
    serve = serving_function(classifier)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(STABLEHLO_INPUT_SHAPE), jnp.uint8)
    exported = jax.export.export(jax.jit(serve), platforms=platforms)(spec)
    atomic_file.write_bytes(path, bytes(exported.serialize()))
    _write_metadata(path, classifier, format="stablehlo", platforms=list(platforms))
    return path


def load_stablehlo(path: str):
    """A function uint8 [B, H, W, 3] -> numpy probabilities, from a serialized export."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    call = jax.jit(exported.call)
    return lambda images: np.asarray(call(jnp.asarray(images, jnp.uint8)))


def export_tflite(
    classifier: Classifier,
    path: str,
    *,
    quantize: str | None = None,
    per_channel: bool = True,
    representative_images=None,
    any_size: bool | None = None,
) -> str:
    """Converts the serving function to TFLite (batch 1).

    Args:
      classifier: the model to export.
      path: the .tflite file to write.
      quantize: None (float32) or 'int8': post-training quantization of weights and
        activations (float fallback where an op has no int8 kernel); input stays uint8 and
        output float32 probabilities.
      per_channel: int8 weights with one scale per output channel (TFLite's default) or,
        with False, one per tensor (smaller, usually less accurate).
      representative_images: uint8 [N, H, W, 3] training crops that calibrate the int8
        activation ranges (a few hundred is plenty); required for 'int8'.
      any_size: input [1, H, W, 3] of any H, W (resized in the graph) or, with False,
        [1, S, S, 3] (the app resizes as `mnres.data` does). Default: any size for float32,
        S x S for int8, whose calibration freezes the resize to the calibration crops' size
        (measured with TF 2.21: any other size then fails to run).
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}; use None (float32) or 'int8'")
    if quantize and (representative_images is None or len(representative_images) == 0):
        raise ValueError("int8 quantization needs representative_images (training crops)")
    any_size = not quantize if any_size is None else any_size
    if quantize and any_size:
        raise ValueError(
            "an int8 TFLite model takes S x S crops only: its calibration freezes the in-graph "
            "resize to one input size"
        )
    model_bytes = _tflite_bytes(classifier, quantize, per_channel, representative_images, any_size)
    size = classifier.image_size
    atomic_file.write_bytes(path, model_bytes)
    _write_metadata(
        path,
        classifier,
        format="tflite",
        quantization=quantize or "float32",
        per_channel=bool(quantize and per_channel),
        calibration_images=0 if not quantize else len(representative_images),
        input="uint8 RGB [1, height, width, 3], any height and width"
        if any_size
        else f"uint8 RGB [1, {size}, {size}, 3]; resize other crops as the training decode",
    )
    return path


@contextlib.contextmanager
def _stablehlo_readable_by_tensorflow():
    """jax2tf writes StableHLO that the installed TFLite converter can read.

    jax serializes for StableHLO ~4 weeks old (jax 0.12: 1.18), newer than TensorFlow 2.21's
    converter reads (1.13.7): it fails with "failed to deserialize portable artifact". jax has
    no public switch for the target version, so its private chooser is capped at the
    converter's version while converting; with jax or TF internals not where expected, nothing
    changes (and a too-new artifact fails as before, with TF's message).
    """
    try:
        from jax._src.export import _export
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

        choose = _export.hlo.get_version_from_compatibility_requirement
        readable = tf_stablehlo.get_current_version()
    except (ImportError, AttributeError):
        yield
        return

    def version(requirement):
        chosen = choose(requirement)
        key = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
        return min(chosen, readable, key=key)

    _export.hlo.get_version_from_compatibility_requirement = version
    try:
        yield
    finally:
        _export.hlo.get_version_from_compatibility_requirement = choose


def _tflite_bytes(classifier, quantize, per_channel, representative_images, any_size) -> bytes:
    """The TFLite flatbuffer of `export_tflite`'s arguments (checked there)."""
    tf = tensorflow_logs.import_tensorflow()  # first: jax2tf imports TensorFlow too
    from jax.experimental import jax2tf

    size = classifier.image_size
    # Quiet from the first jax2tf call: jax2tf logs (absl) while it traces.
    with tensorflow_logs.quiet_converter(), _stablehlo_readable_by_tensorflow():
        serve = jax2tf.convert(
            serving_function(classifier),
            polymorphic_shapes=[TFLITE_INPUT_SHAPE if any_size else None],
            with_gradient=False,
        )
        # Batch 1: a symbolic batch keeps BatchNorm from folding into the convolutions.
        hw = [None, None] if any_size else [size, size]
        signature = [tf.TensorSpec([1, *hw, 3], tf.uint8, name="images")]
        function = tf.function(serve, input_signature=signature, autograph=False)
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function()], function
        )
        if quantize == "int8":
            images = [_to_size(image, size) for image in representative_images]

            def representative_dataset():
                for image in images:
                    yield [image[None]]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            # The converter has no public switch for per-tensor weights.
            converter._experimental_disable_per_channel = not per_channel
        with warnings.catch_warnings():
            # The uint8 input is cast to float inside the graph: it needs no input statistics.
            warnings.filterwarnings("ignore", "Statistics for quantized inputs", UserWarning)
            model_bytes = converter.convert()
    return model_bytes


def _to_size(image, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3] by the training decode's rule (Pillow `ImageOps.pad`)."""
    from mnres.data import decode

    image = np.asarray(image, np.uint8)
    return image if image.shape[:2] == (size, size) else decode.decode_image(image, size)


class TFLiteModel:
    """Runs a .tflite export with ai-edge-litert, one crop at a time (its batch is 1)."""

    def __init__(self, path: str, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        signature = self.interpreter.get_input_details()[0]["shape_signature"]
        # None: any crop size; else the model's S (crops of another size are resized here).
        self.input_size = None if signature[1] < 0 else int(signature[1])
        self._shape = None

    def op_names(self) -> list[str]:
        """Builtin op names of the graph (e.g. 'DEPTHWISE_CONV_2D')."""
        # LiteRT's Python interpreter lists ops only through this private method.
        return [op["op_name"] for op in self.interpreter._get_ops_details()]

    def predict_one(self, image) -> np.ndarray:
        """uint8 [H, W, 3] -> probabilities [C]."""
        image = np.asarray(image, np.uint8)
        if self.input_size is not None:
            image = _to_size(image, self.input_size)
        image = image[None]
        if image.shape != self._shape:  # re-plans the graph for a new crop size
            self.interpreter.resize_tensor_input(self._input, image.shape)
            self.interpreter.allocate_tensors()
            self._shape = image.shape
        self.interpreter.set_tensor(self._input, image)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output)[0].copy()

    def __call__(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] (or a list of [H, W, 3] crops) -> probabilities [B, C]."""
        return np.stack([self.predict_one(image) for image in images])


def load_tflite(path: str, num_threads: int | None = None) -> TFLiteModel:
    return TFLiteModel(path, num_threads)


def export_onnx(classifier: Classifier, path: str) -> str:
    """Converts the serving function to ONNX with `jax2onnx` (batch, height, width dynamic).

    Optional: jax2onnx (0.17) pins orbax-checkpoint < 0.11.37, so it is not in mnres' extras.
    """
    from jax2onnx import to_onnx

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(STABLEHLO_INPUT_SHAPE), jnp.uint8)
    proto = to_onnx(serving_function(classifier), [spec], model_name="mnres")
    # One self-contained file (jax2onnx's own file mode moves large weights to FILE.data).
    atomic_file.write_bytes(path, proto.SerializeToString())
    _write_metadata(path, classifier, format="onnx")
    return path


def load_onnx(path: str):
    """A function uint8 [B, H, W, 3] -> probabilities, run by onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.asarray(images, np.uint8)})[0]


FORMATS = ("stablehlo", "tflite", "int8", "onnx")
DEFAULT_FORMATS = ("stablehlo", "tflite", "int8")
FILE_NAMES = {
    "stablehlo": "model.stablehlo",
    "tflite": "model_float32.tflite",
    "int8": "model_int8.tflite",
    "onnx": "model.onnx",
}


_NEEDS = {"tflite": ("tensorflow",), "int8": ("tensorflow",), "onnx": ("jax2onnx", "onnxruntime")}


def export_run(
    classifier: Classifier,
    out_dir: str,
    formats=DEFAULT_FORMATS,
    *,
    per_channel: bool = True,
    representative_images=None,
    progress: bool = False,
) -> dict:
    """Writes the chosen formats to `out_dir` (`FILE_NAMES`); returns {format: path}.

    int8 calibrates on `representative_images`, by default 256 crops of the run's training
    split (`mnres.data.sample.calibration_images`). `progress`: a bar over the formats on
    stderr (when it is a terminal; a conversion takes seconds to minutes).
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(sorted(unknown))}; use {FORMATS}")
    for fmt in formats:
        missing = [m for m in _NEEDS.get(fmt, ()) if importlib.util.find_spec(m) is None]
        if missing:
            extra = "pip install 'mnres[export]'" if fmt in ("tflite", "int8") else ""
            raise ValueError(
                f"{fmt} export needs {' and '.join(missing)}: "
                + (extra or f"pip install {' '.join(missing)}")
            )
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    bar = crops.progress(len(formats), "export", progress)
    for fmt in formats:
        bar.set_postfix_str(fmt)
        path = os.path.join(out_dir, FILE_NAMES[fmt])
        if fmt == "stablehlo":
            paths[fmt] = export_stablehlo(classifier, path)
        elif fmt == "tflite":
            paths[fmt] = export_tflite(classifier, path)
        elif fmt == "onnx":
            paths[fmt] = export_onnx(classifier, path)
        else:
            if representative_images is None:
                if classifier.config is None:
                    raise ValueError("int8 needs representative_images or a run's config")
                from mnres.data import sample

                train = run_dataset(classifier.config).train
                representative_images = sample.calibration_images(train)
            paths[fmt] = export_tflite(
                classifier,
                path,
                quantize="int8",
                per_channel=per_channel,
                representative_images=representative_images,
            )
        bar.update()
    bar.close()
    return paths
