import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from training.data import DataError, IdxSource, ensure_idx_files, load_dataset, load_idx, load_idx_dataset, shuffled_batches


def test_mnist_5k_is_a_stratified_4500_500_split(digits):
    assert len(digits.train) == 4500 and len(digits.val) == 500
    assert digits.train.images.shape == (4500, 1, 28, 28)
    assert digits.train.labels.bincount().tolist() == [450] * 10
    assert digits.val.labels.bincount().tolist() == [50] * 10
    assert 0.0 == digits.train.images.min() and digits.train.images.max() == 1.0


def test_mnist_5k_split_is_fixed_and_disjoint(digits):
    again = load_dataset("mnist-5k")
    assert (again.train.images == digits.train.images).all()
    train_rows = {bytes(r) for r in (digits.train.images * 255).byte().flatten(1).numpy()}
    val_rows = {bytes(r) for r in (digits.val.images * 255).byte().flatten(1).numpy()}
    assert not train_rows & val_rows


def test_limit_keeps_a_roughly_balanced_prefix():
    counts = load_dataset("mnist-5k", limit=300).train.labels.bincount(minlength=10)
    assert counts.sum() == 300 and counts.min() >= 15


def test_unknown_dataset_is_named():
    with pytest.raises(DataError, match="unknown dataset 'emnist'"):
        load_dataset("emnist")


def test_batches_are_a_fresh_permutation_of_full_batches():
    import torch
    g = torch.Generator().manual_seed(0)
    first, second = shuffled_batches(100, 32, g), shuffled_batches(100, 32, g)
    assert [len(b) for b in first] == [32, 32, 32]
    assert len(torch.cat(first).unique()) == 96
    assert not torch.equal(torch.cat(first), torch.cat(second))


# --- IDX files ------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=20, n_val=10, compress=True) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_val, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_val),
    }
    files = {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        files[name] = gzip.compress(data) if compress else data
        (folder / name).write_bytes(files[name])
    return files


def source_for(files: dict[str, bytes], mirrors) -> IdxSource:
    """The files' MD5s (of what the mirror serves) and SHA-256s of their uncompressed content."""
    return IdxSource(files={n: hashlib.md5(b).hexdigest() for n, b in files.items()}, mirrors=tuple(mirrors),
                     sha256={n: hashlib.sha256(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b).hexdigest()
                             for n, b in files.items()})


def test_a_recompressed_copy_of_the_official_content_is_accepted(tmp_path):
    files = write_idx_set(tmp_path)
    source = source_for(files, [])
    name = "train-images-idx3-ubyte.gz"
    (tmp_path / name).write_bytes(gzip.compress(gzip.decompress(files[name]), compresslevel=1, mtime=7))
    assert (tmp_path / name).read_bytes() != files[name]
    assert len(load_idx_dataset("mnist", tmp_path, source, tuple("0123456789")).train) == 20


def test_a_present_file_whose_content_differs_from_the_official_one_is_refused_by_name(tmp_path):
    files = write_idx_set(tmp_path)
    source = source_for(files, [])
    array = np.random.default_rng(1).integers(0, 256, (20, 28, 28))  # same shape, other pixels
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: its uncompressed content differs "
                                        "from the official file"):
        load_idx_dataset("mnist", tmp_path, source, tuple("0123456789"))


def test_mnist_checks_every_file_against_the_official_sha256():
    from training.data import MNIST_SOURCE
    assert set(MNIST_SOURCE.sha256) == set(MNIST_SOURCE.files)
    assert all(len(v) == 64 for v in MNIST_SOURCE.sha256.values())


def test_idx_dataset_loads_gzipped_and_plain_files(tmp_path):
    for compress in (True, False):
        folder = tmp_path / str(compress)
        files = write_idx_set(folder, compress=compress)
        data = load_idx_dataset("mnist", folder, source_for(files, ["http://unused/"]), tuple("0123456789"))
        assert data.train.images.shape == (20, 1, 28, 28) and len(data.val) == 10
        assert data.train.images.max() <= 1.0


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-7], "truncated or corrupt"),
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "bad IDX magic"),
    (lambda b: b"\x00\x00\x08\x02" + b[4:], "2 dimensions, expected 3"),
    (lambda b: b[:2], "too short"),
])
def test_bad_idx_files_are_named_with_the_problem(tmp_path, mangle, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(np.zeros((3, 28, 28)))))
    with pytest.raises(DataError, match=message) as err:
        load_idx(path, ndim=3)
    assert str(path) in str(err.value)


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28))))[:-10])
    with pytest.raises(DataError, match=f"{path}: corrupt or truncated gzip"):
        load_idx(path, ndim=3)


def test_mismatched_image_and_label_counts_are_named(tmp_path):
    files = write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(19))))
    files["train-labels-idx1-ubyte.gz"] = (tmp_path / "train-labels-idx1-ubyte.gz").read_bytes()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: 19 labels for 20 images"):
        load_idx_dataset("mnist", tmp_path, source_for(files, []), tuple("0123456789"))


def test_wrong_image_size_is_named(tmp_path):
    files = write_idx_set(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((10, 32, 32)))))
    files["t10k-images-idx3-ubyte.gz"] = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: images are 32x32"):
        load_idx_dataset("mnist", tmp_path, source_for(files, []), tuple("0123456789"))


# --- download -------------------------------------------------------------------------------------

@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server serving tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_missing_files_are_downloaded_and_verified(tmp_path, mirror):
    root, url = mirror
    files = write_idx_set(root / "mnist")
    dest = tmp_path / "data"
    source = source_for(files, [url + "mnist/"])
    data = load_idx_dataset("mnist", dest, source, tuple("0123456789"))
    assert len(data.train) == 20
    for name, content in files.items():
        assert (dest / name).read_bytes() == content
    assert not list(dest.glob(".*tmp"))


def test_checksum_mismatch_is_rejected_and_nothing_is_kept(tmp_path, mirror):
    root, url = mirror
    files = write_idx_set(root / "mnist")
    source = source_for(files, [url + "mnist/"])
    (root / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        ensure_idx_files(dest, source)
    assert "missing train-labels-idx1-ubyte.gz" in str(err.value)
    assert not (dest / "train-labels-idx1-ubyte.gz").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted(set(files) - {"train-labels-idx1-ubyte.gz"})


def test_a_bad_mirror_falls_through_to_the_next(tmp_path, mirror):
    root, url = mirror
    files = write_idx_set(root / "good")
    (root / "bad").mkdir()
    for name in files:
        (root / "bad" / name).write_bytes(b"not the file")
    source = source_for(files, [url + "missing/", url + "bad/", url + "good/"])
    ensure_idx_files(tmp_path / "data", source)
    assert all((tmp_path / "data" / n).read_bytes() == b for n, b in files.items())


def test_offline_error_says_which_files_to_put_where(tmp_path):
    files = write_idx_set(tmp_path / "elsewhere")
    source = source_for(files, ["http://127.0.0.1:9/"])  # the discard port: connection refused
    dest = tmp_path / "data"
    with pytest.raises(DataError) as err:
        ensure_idx_files(dest, source, timeout=2)
    message = str(err.value)
    assert str(dest) in message and "train-images-idx3-ubyte.gz" in message and "Put the files there" in message
