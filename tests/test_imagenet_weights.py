"""ImageNet weights: the table of Keras' files, the download cache, its checks, training's use.

A Keras MobileNet (alpha 0.25, 128 px, no top, random weights) is written once per module in the
layout of Keras' published files and served from a local HTTP server that counts requests;
nothing here reaches a real host.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnres
from experiments.configs import paper
from mnres import config as config_lib
from mnres import provenance
from mnres.models.params import abstract_variables
from mnres.training.steps import TrainState
from mnres.weights import imagenet as iw
from mnres.weights import transfer

h5py = pytest.importorskip("h5py")

FILE = "mobilenet_2_5_128_tf_no_top.h5"  # what Keras names alpha 0.25, 128 px, no top
# Keras MobileNet layers an mnres MobileNetV1 has, and the seed network (cut after block 12) not.
SEED_SKIPPED = ("conv_pw_12", "conv_pw_12_bn", "conv_dw_13", "conv_dw_13_bn", "conv_pw_13",
                "conv_pw_13_bn")  # fmt: skip

# Writes the Keras 2 weights-only HDF5 layout of keras.applications' files: `layer_names` (every
# layer, weighted or not), a group per layer, weights named 'layer/weight:0', depthwise kernels
# named 'depthwise_kernel'.
_WRITE_KERAS_FILE = textwrap.dedent(
    """
    import sys
    import h5py, keras, numpy as np
    model = keras.applications.MobileNet(
        weights=None, alpha=0.25, include_top=False, input_shape=(128, 128, 3))
    rng = np.random.default_rng(0)
    with h5py.File(sys.argv[1], "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [w.name for w in layer.weights]
            if type(layer).__name__ == "DepthwiseConv2D":
                names = ["depthwise_kernel" if n == "kernel" else n for n in names]
            full = [f"{layer.name}/{n}:0".encode() for n in names]
            group.attrs["weight_names"] = full
            for name, value in zip(full, layer.get_weights()):
                # Random values everywhere, so every copied array is told apart from init.
                group.create_dataset(name.decode(), data=rng.uniform(0.5, 1.5, value.shape))
    """
)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """(bytes, {layer: {weight: array}}) of the Keras file, made once per module."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("needs Keras to write the weights file")
    path = tmp_path_factory.mktemp("keras") / FILE
    # A subprocess, so this one keeps its Keras backend; Keras' numpy backend builds the model in
    # under a second (the jax backend takes ~20 s on a 2-core Intel Xeon).
    env = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run(
        [sys.executable, "-c", _WRITE_KERAS_FILE, str(path)], check=True, env=env, timeout=300
    )
    with h5py.File(path, "r") as f:
        names = {layer: list(map(_text, f[layer].attrs["weight_names"])) for layer in f}
        arrays = {
            layer: {w.split("/")[-1].split(":")[0]: np.asarray(f[layer][w]) for w in weights}
            for layer, weights in names.items()
        }
    return path.read_bytes(), arrays


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Server:
    """A local HTTP server for the Keras file; counts the requests it answers.

    `cut_at`: the number of bytes of each body sent before the server closes the connection
    (its Content-Length still the whole body's), as a dropped connection does; None: all.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.cut_at = files, 0, None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's name
                server.requests += 1
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: server.cut_at])
                if server.cut_at is not None:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, file: str = FILE) -> str:
        return self.base + file


@pytest.fixture(scope="module")
def _module_server(keras_file):
    s = _Server({FILE: keras_file[0]})
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def server(_module_server, keras_file):
    """The server, its request count at 0, serving the Keras file whole."""
    _module_server.requests, _module_server.cut_at = 0, None
    _module_server.files[FILE] = keras_file[0]
    return _module_server


@pytest.fixture(autouse=True)
def _local(monkeypatch, tmp_path):
    """No proxy between the tests and 127.0.0.1; a cache of the test's own."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(iw.CACHE_ENV, str(tmp_path / "cache"))


def _closed_port_url(file: str = FILE) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{file}"


def _cache_files(cache) -> list[str]:
    folder = os.path.join(cache, iw.WEIGHTS_SUBDIR)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@functools.cache
def _shapes(name: str, **fields):
    model = mnres.create_model(name, alpha=0.25, **fields)
    return model, abstract_variables(model, (1, 128, 128, 3))


def _leaf(variables, layer: str, leaf: str):
    """The array of `layer`'s `leaf` (e.g. 'kernel', 'mean'), wherever it sits in the tree."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    found = [
        x for path, x in flat if [str(getattr(k, "key", "")) for k in path][-2:] == [layer, leaf]
    ]
    assert len(found) == 1, (layer, leaf)
    return np.asarray(found[0])


@pytest.mark.parametrize("fields", [{"include_top": False}, {"num_classes": 2}], ids=str)
def test_download_loads_every_layer(keras_file, server, tmp_path, fields):
    model, shapes = _shapes("mobilenet_v1", **fields)
    cache = tmp_path / "cache"
    variables, report = iw.load_imagenet(
        model, shapes, image_size=128, cache_dir=cache, url=server.url()
    )
    assert server.requests == 1
    body_layers = [n for n in model.layer_names() if n != "conv_preds"]
    assert list(report.loaded) == body_layers and not report.skipped
    assert report.left_at_init == (
        {"conv_preds": "not in the Keras source"} if model.include_top else {}
    )
    arrays = keras_file[1]
    np.testing.assert_array_equal(
        _leaf(variables, "conv_dw_3", "kernel"),
        arrays["conv_dw_3"]["depthwise_kernel"].reshape(3, 3, 1, -1).astype(np.float32),
    )
    np.testing.assert_array_equal(
        _leaf(variables, "conv_pw_13_bn", "var"),
        arrays["conv_pw_13_bn"]["moving_variance"].astype(np.float32),
    )
    path = cache / iw.WEIGHTS_SUBDIR / FILE
    assert path.read_bytes() == keras_file[0]
    assert iw.recorded_sha256(path) == provenance.file_sha256(path)
    assert _cache_files(cache) == [FILE, FILE + ".sha256"]


def test_cache_is_reused_without_network(server, tmp_path):
    first = iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    # Cached: no request, even where the address would fail.
    second = iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=_closed_port_url())
    assert first == second and server.requests == 1
    # Its hash can be pinned too.
    pinned = iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, sha256=iw.file_sha256(first))
    assert pinned == first and server.requests == 1


def test_default_cache_is_mnres_cache(server, tmp_path, monkeypatch):
    path = iw.fetch("mobilenet_v1", 0.25, 128, url=server.url())
    assert path == str(tmp_path / "cache" / iw.WEIGHTS_SUBDIR / FILE)
    monkeypatch.delenv(iw.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert iw.default_cache_dir() == str(tmp_path / "home" / ".cache" / "mnres")


def test_pinned_checksum_mismatch_caches_nothing(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"not the {wrong} asked for; nothing was cached"):
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url(), sha256=wrong)
    assert _cache_files(tmp_path) == []


def test_recorded_hash_catches_a_damaged_file(server, tmp_path):
    path = iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="not the .* recorded when it was downloaded"):
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    assert server.requests == 1


def test_download_cut_short_is_not_cached(keras_file, server, tmp_path):
    server.cut_at = len(keras_file[0]) // 2
    with pytest.raises(iw.DownloadError) as info:
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    message = str(info.value)
    assert "\n" not in message and f"closed after {server.cut_at:,} of its" in message
    assert _cache_files(tmp_path) == []
    server.cut_at = None  # the connection holds this time
    path = iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    assert open(path, "rb").read() == keras_file[0] and server.requests == 2
    assert iw.recorded_sha256(path) == provenance.file_sha256(path)


def test_hdf5_signature_then_junk_is_not_cached(keras_file, server, tmp_path):
    junk = np.random.default_rng(0).bytes(len(keras_file[0]) - 8)
    server.files[FILE] = b"\x89HDF\r\n\x1a\n" + junk  # the signature, then nothing HDF5
    with pytest.raises(ValueError, match=r"not a readable HDF5 file .*nothing was cached$") as e:
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    assert "\n" not in str(e.value) and str(e.value).startswith(server.url())
    assert _cache_files(tmp_path) == []
    server.files[FILE] = keras_file[0]
    iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    assert _cache_files(tmp_path) == [FILE, FILE + ".sha256"] and server.requests == 2


def _cache_as_before(cache, body: bytes, file: str = FILE) -> None:
    """`body` cached as mnres 0.2.0 cached any download: the file and its recorded sha256."""
    folder = os.path.join(cache, iw.WEIGHTS_SUBDIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file)
    with open(path, "wb") as f:
        f.write(body)
    with open(path + ".sha256", "w") as f:
        f.write(f"{provenance.file_sha256(path)}  {file}\n")


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_bad_download_in_the_cache_is_removed_and_fetched_again(
    keras_file, server, tmp_path, damage
):
    body = keras_file[0]
    body = body[: len(body) // 2] if damage == "truncated" else body[:8] + bytes(len(body) - 8)
    _cache_as_before(tmp_path, body)
    with pytest.raises(ValueError, match="Removed it from the cache: run again") as e:
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    assert "\n" not in str(e.value) and "not a readable HDF5 file" in str(e.value)
    assert _cache_files(tmp_path) == [] and server.requests == 0
    path = iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())
    assert open(path, "rb").read() == keras_file[0] and server.requests == 1


def test_training_over_a_bad_cache_says_one_line(keras_file, tmp_path):
    """`pretrained=imagenet` with a download cut short in the cache: one line, no traceback."""
    cache = tmp_path / "cache"
    # A download cut short of the file the smoke config's model takes.
    _cache_as_before(cache, keras_file[0][:4096], "mobilenet_2_5_224_tf_no_top.h5")
    env = {**os.environ, iw.CACHE_ENV: str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.malaria", "--config=experiments/configs/smoke.py",
         "--config.model.pretrained=imagenet", f"--workdir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "Removed it from the cache" in errors[0], proc.stderr[-3000:]
    assert _cache_files(cache) == []


def test_offline_fails_fast_with_one_line(tmp_path):
    url = _closed_port_url()
    start = time.monotonic()
    with pytest.raises(iw.DownloadError) as info:
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=url, timeout=3.0)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert isinstance(info.value, ConnectionError) and "\n" not in message
    for part in (url, f"config.model.pretrained=PATH/{FILE}", "load_keras_weights("):
        assert part in message
    assert _cache_files(tmp_path) == []


def test_missing_file_names_http_status(server, tmp_path):
    with pytest.raises(iw.DownloadError, match="HTTP 404"):
        iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url("nothing.h5"))
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize(
    "model, alpha, size, top, file",
    [
        ("mobilenet_v1", 1.0, 224, False, "mobilenet_1_0_224_tf_no_top.h5"),
        ("mobilenet_v1", 0.75, 160, True, "mobilenet_7_5_160_tf.h5"),
        ("mobilenet_v1", 0.5, 96, False, "mobilenet_5_0_224_tf_no_top.h5"),  # no 96 px file
        ("paper", 1.0, 64, False, "mobilenet_1_0_224_tf_no_top.h5"),
        ("paper", 1.0, 128, False, "mobilenet_1_0_128_tf_no_top.h5"),
        ("mobilenet_v1_residual", 0.25, 192, False, "mobilenet_2_5_192_tf_no_top.h5"),
        ("mobilenet_v2", 0.35, 96, False,
         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"),
        ("mobilenet_v2", 0.5, 64, False,
         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"),
        ("mobilenet_v2", 1.4, 224, True,
         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.4_224.h5"),
    ],
)  # fmt: skip
def test_the_table_picks_keras_file(model, alpha, size, top, file):
    choice = iw.choose_weights(model, alpha, size, include_top=top)
    assert choice.file == file
    family = "mobilenet_v2" if model == "mobilenet_v2" else "mobilenet"
    assert (
        choice.url
        == f"https://storage.googleapis.com/tensorflow/keras-applications/{family}/{file}"
    )
    assert (f"not {size}" in choice.why) == (choice.file_size != size)


def test_unpublished_alpha_names_the_published_ones():
    with pytest.raises(ValueError, match=r"alpha 0\.25, 0\.5, 0\.75, 1\.0 only, not alpha=0\.35"):
        iw.choose_weights("mobilenet_v1", 0.35)
    with pytest.raises(ValueError, match="0.35, 0.5, 0.75, 1.0, 1.3, 1.4 only"):
        iw.choose_weights("mobilenet_v2", 0.25)


def test_available_lists_every_file():
    rows = iw.available()
    assert len(rows) == 2 * (4 * 4 + 6 * 5)
    assert len({r["file"] for r in rows}) == len(rows)
    assert set(rows[0]) == {"model", "alpha", "image_size", "include_top", "url", "file"}
    assert all(r["url"].endswith("/" + r["file"]) for r in rows)


def _paper_config(pretrained):
    config = paper.get_config()
    config.model.alpha = 0.25
    config.model.pretrained = pretrained
    config.data.image_size = 128
    return config


def test_validation_accepts_imagenet_and_files_not_missing_paths(tmp_path):
    config_lib.validate(_paper_config("imagenet"))
    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"")
    config_lib.validate(_paper_config(str(weights)))
    with pytest.raises(config_lib.ConfigError, match="'imagenet'.*\\.h5"):
        config_lib.validate(_paper_config(str(tmp_path / "missing.h5")))
    config = _paper_config("imagenet")
    config.model.alpha = 0.3
    with pytest.raises(config_lib.ConfigError, match="alpha 0.25, 0.5, 0.75, 1.0 only"):
        config_lib.validate(config)


def test_training_loads_imagenet_for_the_seed_network(keras_file, server, monkeypatch, caplog):
    monkeypatch.setitem(iw.BASE_URLS, "mobilenet_v1", server.base)
    config = _paper_config("imagenet")
    model = mnres.models.from_config(config.model)
    shapes = abstract_variables(model, (1, 128, 128, 3))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes))
    state = TrainState(zeros["params"], zeros["batch_stats"], {}, jnp.int32(0), jnp.zeros(2))
    with caplog.at_level("INFO"):
        state = transfer.warm_start(config.model, model, state, image_size=128)
    assert server.requests == 1
    sha256 = iw.file_sha256(os.path.join(iw.weights_dir(), FILE))
    assert any(sha256 in r.getMessage() and FILE in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(
        _leaf(state.params, "conv_dw_12", "kernel"),
        keras_file[1]["conv_dw_12"]["depthwise_kernel"].reshape(3, 3, 1, -1).astype(np.float32),
    )
    assert not np.any(_leaf(state.params, "predictions", "bias"))  # the new head: at init
    report = iw.load_checked(model, shapes, os.path.join(iw.weights_dir(), FILE))[1]
    assert set(report.skipped) == set(SEED_SKIPPED)


def test_a_path_works_where_imagenet_does(keras_file, tmp_path):
    weights = tmp_path / "elsewhere.h5"
    weights.write_bytes(keras_file[0])
    assert iw.resolve(str(weights), "paper", 0.25) == (str(weights), iw.file_sha256(weights))
    with pytest.raises(FileNotFoundError, match="'imagenet' or the path"):
        iw.resolve(str(tmp_path / "missing.h5"), "paper", 0.25)


def test_load_pretrained_takes_imagenet_names_from_the_cache(server, tmp_path):
    import mnres

    iw.fetch("mobilenet_v1", 0.25, 128, cache_dir=tmp_path, url=server.url())  # fills the cache
    name = "mobilenet_v1_0.25_128.imagenet"
    assert name in {e["name"] for e in mnres.list_pretrained()}
    loaded = mnres.load_pretrained(name, num_classes=3, cache_dir=tmp_path)
    assert server.requests == 1  # the cached file, no second download
    assert loaded.image_size == 128 and loaded.model.num_classes == 3
    assert loaded.preprocessing["scale"] == "x / 127.5 - 1"
    logits, _ = loaded.model.apply(loaded.variables, np.zeros((1, 128, 128, 3)), train=False)
    assert logits.shape == (1, 3)
    wider = mnres.create_model("mobilenet_v1", alpha=0.5, num_classes=3)
    with pytest.raises(ValueError, match="alpha=0.25 \\(this model has 0.5\\)"):
        mnres.load_pretrained(name, num_classes=3, cache_dir=tmp_path, model=wider)
