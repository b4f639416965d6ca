"""softshare.data: dataset readers (on generated files in the real layouts, and on real data where
installed), safe download/extraction, the train/val split, and the on-device batch loader checked
against plain per-image reference implementations."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from softshare.data import (
    DATASETS,
    BatchLoader,
    ImageDataset,
    augment,
    channel_stats,
    cifar,
    default_data_root,
    download,
    idx,
    load_dataset,
    split_indices,
)
from softshare.errors import SoftshareError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- CIFAR fixtures


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the CIFAR batches: strings as BINSTRING opcodes
    (they load as bytes with encoding='bytes') and numpy 1's `numpy.core.multiarray` names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_files(name: str, rng: np.random.Generator) -> tuple[dict[str, bytes], dict]:
    """Small batches in the exact CIFAR layout, and the arrays they hold."""
    spec = cifar.SPECS[name]
    files, expected = {}, {}
    for split, file_names, per_file in (("train", spec.train_files, 4), ("test", spec.test_files, 6)):
        datas, labels = [], []
        for file in file_names:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, spec.num_classes, per_file).tolist()
            batch = {b"batch_label": b"testing batch 1 of 1", b"data": data,
                     b"filenames": [b"img_%d.png" % i for i in range(per_file)], spec.label_key: y}
            if name == "cifar100":
                batch[b"coarse_labels"] = [v // 5 for v in y]
            files[file] = py2_pickle(batch)
            datas.append(data)
            labels += y
        expected[split] = (np.concatenate(datas), np.array(labels))
    names = [b"class%03d" % i for i in range(spec.num_classes)]
    files[spec.meta_file] = py2_pickle({spec.names_key: names, b"num_cases_per_batch": 4})
    expected["classes"] = tuple(n.decode() for n in names)
    return files, expected


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for file, blob in files.items():
        (folder / file).write_bytes(blob)


def write_tar(path: Path, members: dict[str, bytes], folder: str | None = None) -> None:
    """A .tar.gz like the official one: a directory entry, then files in a scrambled order."""
    with tarfile.open(path, "w:gz") as tar:
        if folder:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for member, blob in sorted(members.items(), reverse=True):
            info = tarfile.TarInfo(f"{folder}/{member}" if folder else member)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_fixture_pickles_look_like_python2_cifar():
    blob = py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})
    assert blob.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in blob
    assert b"_codecs" not in blob and b"U\x04data" in blob
    loaded = pickle.loads(blob, encoding="bytes")
    assert loaded[b"labels"] == [1, 2] and loaded[b"data"].shape == (2, 3072)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "archive"])
def test_cifar_reads_folder_and_archive(tmp_path, name, form):
    spec = cifar.SPECS[name]
    files, expected = cifar_files(name, np.random.default_rng(0))
    if form == "folder":
        write_folder(tmp_path / spec.folder, files)
    else:
        write_tar(tmp_path / spec.archive, {**files, "readme.html": b"<html/>"}, spec.folder)
    ds = load_dataset(name, root=tmp_path)
    n_train = 4 * len(spec.train_files)
    assert ds.train_images.shape == (n_train, 3, 32, 32) and ds.test_images.shape == (6, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    for images, labels, (data, y) in ((ds.train_images, ds.train_labels, expected["train"]),
                                      (ds.test_images, ds.test_labels, expected["test"])):
        # row-major RGB planes: pixel (c, row, col) is column c*1024 + row*32 + col
        n, c, r, col = 1, 2, 5, 30
        assert images[n, c, r, col].item() == data[n, c * 1024 + r * 32 + col]
        assert images[:, 0].reshape(len(data), -1).numpy().tolist() == data[:, :1024].tolist()
        assert labels.tolist() == y.tolist()
    assert ds.num_classes == spec.num_classes == len(ds.classes) and ds.classes == expected["classes"]
    assert ds.in_channels == 3 and ds.default_val_size == 5000
    means = {"cifar10": (125.3, 123.0, 113.9), "cifar100": (129.3, 124.1, 112.4)}[name]
    stds = {"cifar10": (63.0, 62.1, 66.7), "cifar100": (68.2, 65.4, 70.4)}[name]
    assert ds.mean == pytest.approx([m / 255 for m in means]) and ds.std == pytest.approx([s / 255 for s in stds])


def test_cifar_missing_says_what_to_put_where(tmp_path):
    with pytest.raises(SoftshareError) as err:
        load_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    for part in (str(tmp_path), "cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_5",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "download=True"):
        assert part in msg


def test_cifar_missing_batch_names_its_path(tmp_path):
    files, _ = cifar_files("cifar10", np.random.default_rng(0))
    del files["data_batch_3"]
    write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(SoftshareError, match=str(tmp_path / "cifar-10-batches-py" / "data_batch_3")):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict", "wrong_shape", "bad_labels",
                                    "label_range"])
def test_cifar_corrupt_batch_is_a_clear_error(tmp_path, damage):
    files, _ = cifar_files("cifar10", np.random.default_rng(0))
    files["data_batch_2"] = {
        "truncated": files["data_batch_2"][: len(files["data_batch_2"]) // 2],
        "garbage": b"\x00not a pickle at all",
        "not_a_dict": py2_pickle([1, 2, 3]),
        "wrong_shape": py2_pickle({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}),
        "bad_labels": py2_pickle({b"data": np.zeros((4, 3072), np.uint8), b"labels": 4}),
        "label_range": py2_pickle({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}),
    }[damage]
    write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(SoftshareError, match="data_batch_2"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_truncated_archive_is_a_clear_error(tmp_path):
    files, _ = cifar_files("cifar10", np.random.default_rng(0))
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_tar(archive, files, "cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(SoftshareError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    blob = py2_pickle({b"data": Exploit()})
    with pytest.raises(SoftshareError, match="posix.system|os.system"):
        cifar.unpickle_batch(blob, "evil_batch")
    assert not marker.exists()


# --------------------------------------------------------------------------- download and extraction


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "hardlink"])
def test_safe_extract_rejects_escaping_members(tmp_path, kind):
    archive, target = tmp_path / "evil.tar.gz", tmp_path / "out" / "target"
    target.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("good.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo({"parent": "../evil", "absolute": str(tmp_path / "evil")}.get(kind, "link"))
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(tmp_path / "evil")
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(SoftshareError, match="refusing to extract"):
        download.safe_extract(archive, target)
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (target / "link").exists()


@pytest.fixture
def served_cifar(tmp_path, monkeypatch):
    """A generated cifar-10-python.tar.gz behind a file:// URL, with its MD5 as the expected one."""
    served = tmp_path / "served"
    served.mkdir()
    files, expected = cifar_files("cifar10", np.random.default_rng(1))
    archive = served / "cifar-10-python.tar.gz"
    write_tar(archive, files, "cifar-10-batches-py")
    monkeypatch.setattr(cifar, "_URL", served.as_uri() + "/")
    spec = dataclasses.replace(cifar.SPECS["cifar10"], md5=download.md5sum(archive))
    monkeypatch.setitem(cifar.SPECS, "cifar10", spec)
    return archive, expected


def test_download_verifies_and_extracts(tmp_path, served_cifar):
    root = tmp_path / "data"
    ds = load_dataset("cifar10", root=root, download=True)
    assert ds.train_labels.tolist() == served_cifar[1]["train"][1].tolist()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temp leftovers
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(cifar.SPECS["cifar10"].files)
    assert load_dataset("cifar10", root=root).test_labels.tolist() == served_cifar[1]["test"][1].tolist()


def test_download_md5_mismatch_leaves_nothing(tmp_path, served_cifar, monkeypatch):
    monkeypatch.setitem(cifar.SPECS, "cifar10", dataclasses.replace(cifar.SPECS["cifar10"], md5="0" * 32))
    root = tmp_path / "data"
    with pytest.raises(SoftshareError, match="MD5") as err:
        load_dataset("cifar10", root=root, download=True)
    assert "cifar-10-python.tar.gz" in str(err.value) and str(root) in str(err.value)
    assert list(root.iterdir()) == []


def test_download_of_malicious_archive_leaves_nothing(tmp_path, served_cifar, monkeypatch):
    archive, _ = served_cifar
    files, _ = cifar_files("cifar10", np.random.default_rng(2))
    write_tar(archive, {**{f"cifar-10-batches-py/{k}": v for k, v in files.items()}, "../evil": b"x"})
    monkeypatch.setitem(cifar.SPECS, "cifar10",
                        dataclasses.replace(cifar.SPECS["cifar10"], md5=download.md5sum(archive)))
    root = tmp_path / "data"
    with pytest.raises(SoftshareError, match="unsafe member"):
        load_dataset("cifar10", root=root, download=True)
    assert list(root.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_download_offline_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(download, "fetch", offline)
    root = tmp_path / "data"
    with pytest.raises(SoftshareError, match="no network") as err:
        load_dataset("cifar100", root=root, download=True)
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in str(err.value)
    assert str(root) in str(err.value) and list(root.iterdir()) == []


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1)


def idx_files(rng: np.random.Generator, n_train: int = 20, n_test: int = 10) -> tuple[dict[str, bytes], dict]:
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)),
              "train_labels": rng.permutation(np.arange(n_train) % 10),
              "test_images": rng.integers(0, 256, (n_test, 28, 28)),
              "test_labels": rng.permutation(np.arange(n_test) % 10)}
    return {idx.FILES[k]: idx_bytes(v) for k, v in arrays.items()}, arrays


@pytest.fixture
def small_fashion(monkeypatch):
    """Fashion-MNIST expecting 20/10 images and no system copy, so small generated files qualify."""
    spec = dataclasses.replace(idx.SPECS["fashion_mnist"], train_count=20, test_count=10, system_dirs=())
    monkeypatch.setitem(idx.SPECS, "fashion_mnist", spec)
    return spec


def test_read_idx_decodes_header_and_data(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (3, 5, 7)).astype(np.uint8)
    (tmp_path / "a.gz").write_bytes(idx_bytes(array))
    assert np.array_equal(idx.read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize("damage", ["magic", "truncated_data", "truncated_gzip", "not_gzip"])
def test_read_idx_rejects_damaged_files(tmp_path, damage):
    good = idx_bytes(np.zeros((3, 5, 7), np.uint8))
    raw = gzip.decompress(good)
    blob = {"magic": gzip.compress(b"\x00\x00\x0d" + raw[3:]),
            "truncated_data": gzip.compress(raw[:-10]),
            "truncated_gzip": good[:-12],
            "not_gzip": raw}[damage]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(blob)
    with pytest.raises(SoftshareError, match=str(path)):
        idx.read_idx(path)


def test_fashion_mnist_from_root_padded_with_own_stats(tmp_path, small_fashion):
    files, arrays = idx_files(np.random.default_rng(0))
    write_folder(tmp_path / "fashion-mnist", files)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    assert ds.name == "fashion_mnist" and ds.num_classes == 10 and ds.classes[9] == "Ankle boot"
    assert ds.train_images.shape == (20, 1, 32, 32) and ds.test_images.shape == (10, 1, 32, 32)
    assert np.array_equal(ds.train_images[:, 0, 2:30, 2:30].numpy(), arrays["train_images"])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert ds.train_images[:, :, border].eq(0).all()
    assert ds.test_labels.tolist() == arrays["test_labels"].tolist()
    pixels = ds.train_images.double() / 255
    assert ds.mean == pytest.approx([pixels.mean().item()])
    assert ds.std == pytest.approx([pixels.std(unbiased=False).item()])
    unpadded = load_dataset("fashion_mnist", root=tmp_path, pad_to_32=False)
    assert unpadded.train_images.shape == (20, 1, 28, 28) and unpadded.in_channels == 1


@pytest.mark.parametrize("damage", ["imbalanced", "label_10", "count"])
def test_fashion_mnist_content_is_verified(tmp_path, small_fashion, damage):
    rng = np.random.default_rng(0)
    files, arrays = idx_files(rng)
    labels = arrays["train_labels"].copy()
    if damage == "imbalanced":
        labels[labels == 3] = 4
    elif damage == "label_10":
        labels[0] = 10
    else:
        labels = labels[:-1]
    files["train-labels-idx1-ubyte.gz"] = idx_bytes(labels)
    write_folder(tmp_path / "fashion-mnist", files)
    with pytest.raises(SoftshareError, match="fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_idx_missing_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setitem(idx.SPECS, "fashion_mnist",
                        dataclasses.replace(idx.SPECS["fashion_mnist"], system_dirs=(str(tmp_path / "none"),)))
    with pytest.raises(SoftshareError) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    for part in (str(tmp_path / "fashion-mnist"), "t10k-labels-idx1-ubyte.gz", "dataset-fashion-mnist",
                 "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "download=True"):
        assert part in str(err.value)


def test_idx_download_verifies_content_then_moves_into_place(tmp_path, small_fashion, monkeypatch):
    served = tmp_path / "served"
    files, arrays = idx_files(np.random.default_rng(3))
    write_folder(served, files)
    monkeypatch.setitem(idx.SPECS, "fashion_mnist", dataclasses.replace(small_fashion, url=served.as_uri() + "/"))
    root = tmp_path / "data"
    ds = load_dataset("fashion_mnist", root=root, download=True)
    assert ds.train_labels.tolist() == arrays["train_labels"].tolist()
    assert os.listdir(root) == ["fashion-mnist"] and sorted(os.listdir(root / "fashion-mnist")) == sorted(files)

    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_bytes(np.zeros(10, np.uint8)))  # unbalanced
    root = tmp_path / "data2"
    with pytest.raises(SoftshareError, match="class counts"):
        load_dataset("fashion_mnist", root=root, download=True)
    assert os.listdir(root) == []


def test_mnist_download_location():
    assert idx.SPECS["mnist"].url == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert not idx.SPECS["mnist"].balanced  # real MNIST classes are not equally frequent


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"real Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    ds = load_dataset("fashion_mnist", root=tmp_path)  # empty root: found via the system directory
    assert ds.train_images.shape == (60000, 1, 32, 32) and ds.test_images.shape == (10000, 1, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    # published unpadded statistics (mean 0.2860, std 0.3530), scaled to the 32x32 zero-padded images
    keep = 28 * 28 / (32 * 32)
    assert ds.mean[0] == pytest.approx(0.2860 * keep, abs=2e-4)
    assert ds.std[0] ** 2 + ds.mean[0] ** 2 == pytest.approx((0.3530**2 + 0.2860**2) * keep, abs=5e-4)


def test_real_digits():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    assert ds.train_images.max() == 255 and set(ds.test_labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    raw = load_digits()
    first = ds.test_images[0, 0].double() * 16 / 255
    matches = [i for i in range(1797) if np.allclose(raw.images[i], first.numpy(), atol=0.04)]
    assert matches and raw.target[matches[0]] == ds.test_labels[0]
    again = load_dataset("digits")
    assert torch.equal(again.test_images, ds.test_images)  # fixed split


def test_digits_without_sklearn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SoftshareError, match="scikit-learn"):
        load_dataset("digits")


# --------------------------------------------------------------------------- registry, split, stats


def test_registry_names_and_errors(monkeypatch, tmp_path):
    assert set(DATASETS) == {"cifar10", "cifar100", "fashion_mnist", "mnist", "digits"}
    with pytest.raises(SoftshareError, match="unknown dataset 'cifar1'.*cifar10"):
        load_dataset("cifar1")
    monkeypatch.setenv("SOFTSHARE_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("SOFTSHARE_DATA")
    assert default_data_root() == Path.home() / ".cache" / "softshare" / "data"


def test_split_indices():
    train, val = split_indices(100, 30, seed=5)
    assert len(train) == 70 and len(val) == 30
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(split_indices(100, 30, seed=5)[1], val)
    assert not torch.equal(split_indices(100, 30, seed=6)[1], val)
    train, val = split_indices(10, 0, seed=0)
    assert train.tolist() == list(range(10)) and val.numel() == 0
    with pytest.raises(SoftshareError, match="val_size"):
        split_indices(10, 10, seed=0)


def test_channel_stats_matches_float_computation():
    images = torch.randint(0, 256, (37, 3, 5, 6), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=8)
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(x.mean(1).tolist()) and std == pytest.approx(x.std(1, unbiased=False).tolist())


def test_dataset_record_validates():
    x, y = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(SoftshareError, match="uint8"):
        ImageDataset("d", x.float(), y, x, y, 2, (0.5,), (0.5,), ("a", "b"))
    with pytest.raises(SoftshareError, match="mean/std"):
        ImageDataset("d", x, y, x, y, 2, (0.5, 0.5), (0.5,), ("a", "b"))


# --------------------------------------------------------------------------- augmentations vs references


def ref_crop(img: np.ndarray, dy: int, dx: int, pad: int) -> np.ndarray:
    h, w = img.shape[1:]
    return np.pad(img, ((0, 0), (pad, pad), (pad, pad)))[:, dy : dy + h, dx : dx + w]


def ref_cutout(img: np.ndarray, y: int, x: int, length: int) -> np.ndarray:
    """The Cutout paper's code (uoguelph-mlrg/Cutout, util/cutout.py) for one hole."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return img * mask


def test_crop_flip_cutout_match_per_image_references():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 7, 9), dtype=torch.uint8, generator=gen)
    pad = 3
    offsets = torch.randint(0, 2 * pad + 1, (24, 2), generator=gen)
    out = augment.crop(images, offsets, pad)
    for i in range(24):
        assert np.array_equal(out[i].numpy(), ref_crop(images[i].numpy(), *offsets[i].tolist(), pad))
    mask = torch.rand(24, generator=gen) < 0.5
    out = augment.flip(images, mask)
    for i in range(24):
        ref = images[i].numpy()[:, :, ::-1] if mask[i] else images[i].numpy()
        assert np.array_equal(out[i].numpy(), ref)
    normed = torch.randn(24, 3, 7, 9, generator=gen)
    centres = torch.stack([torch.randint(0, 7, (24,), generator=gen), torch.randint(0, 9, (24,), generator=gen)], 1)
    for size in (4, 5, 16):
        out = augment.cutout(normed, centres, size)
        for i in range(24):
            assert np.array_equal(out[i].numpy(), ref_cutout(normed[i].numpy(), *centres[i].tolist(), size))


def test_random_augmentations_draw_valid_parameters():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (300, 2, 4, 4), dtype=torch.uint8, generator=gen)  # no zeros: crops identifiable
    out = augment.random_crop(images, 1, gen)
    seen = set()
    for i in range(300):
        hits = [(dy, dx) for dy in range(3) for dx in range(3)
                if np.array_equal(out[i].numpy(), ref_crop(images[i].numpy(), dy, dx, 1))]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 9
    out = augment.random_flip(images, gen)
    flipped = [not torch.equal(out[i], images[i]) for i in range(300)]
    assert all(torch.equal(out[i], images[i].flip(2)) for i in range(300) if flipped[i])
    assert 0.4 < np.mean(flipped) < 0.6
    normed = torch.rand(300, 1, 6, 6, generator=gen) + 1
    out = augment.random_cutout(normed, 4, gen)
    for i in range(300):
        assert any(np.array_equal(out[i].numpy(), ref_cutout(normed[i].numpy(), y, x, 4))
                   for y in range(6) for x in range(6))


# --------------------------------------------------------------------------- the batch loader

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def make_loader(n=40, batch_size=8, size=4, **kw) -> BatchLoader:
    images = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    return BatchLoader(images, torch.arange(n), MEAN, STD, batch_size, **kw)  # label = sample index


def normalise_ref(img: np.ndarray) -> np.ndarray:
    return (img / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]


def test_loader_without_augmentation_normalises_in_order():
    loader = make_loader(n=20, batch_size=8)
    batches = list(loader.iterate(0))
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [8, 8, 4]
    x = torch.cat([b[0] for b in batches])
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(20))
    assert x.dtype == torch.float32
    assert np.allclose(x.numpy(), np.stack([normalise_ref(i) for i in loader.images.numpy()]), atol=1e-5)


def test_loader_augmented_samples_are_valid_augmentations():
    loader = make_loader(shuffle=True, crop_padding=1, flip=True, cutout=2, seed=3)
    for x, y in loader.iterate(1):
        for xi, src in zip(x.numpy(), loader.images[y].numpy(), strict=True):
            candidates = (ref_cutout(normalise_ref(f(ref_crop(src, dy, dx, 1))), cy, cx, 2)
                          for dy in range(3) for dx in range(3) for f in (lambda a: a, lambda a: a[:, :, ::-1])
                          for cy in range(4) for cx in range(4))
            assert any(np.allclose(xi, c, atol=1e-5) for c in candidates)


def test_loader_is_a_pure_function_of_seed_epoch_batch():
    kw = dict(shuffle=True, crop_padding=2, flip=True, cutout=2, seed=7, size=6)
    a, b = make_loader(**kw), make_loader(**kw)
    epoch0 = list(a.iterate(0))
    for (xa, ya), (xb, yb) in zip(epoch0, b.iterate(0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch1 = list(a.iterate(1))
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in epoch1]))
    assert sorted(torch.cat([y for _, y in epoch1]).tolist()) == list(range(40))
    tail = list(b.iterate(0, start_batch=3))
    assert len(tail) == len(a) - 3
    for (xa, ya), (xt, yt) in zip(epoch0[3:], tail, strict=True):
        assert torch.equal(xa, xt) and torch.equal(ya, yt)
    assert list(a.iterate(0, start_batch=len(a))) == []
    other_seed = make_loader(**{**kw, "seed": 8})
    assert not torch.equal(next(other_seed.iterate(0))[1], epoch0[0][1])


def test_loader_shards_are_disjoint_and_cover_the_epoch():
    for n, world in ((40, 4), (43, 4), (40, 3)):
        shards = [make_loader(n=n, batch_size=4, shuffle=True, world_size=world, rank=r, seed=1) for r in range(world)]
        seen = [torch.cat([y for _, y in s.iterate(2)]).tolist() for s in shards]
        assert len({len(s) for s in seen}) == 1 and len({len(s) for s in shards}) == 1
        union = sorted(sum(seen, []))
        assert len(union) == len(set(union)) == (n // world) * world
        full = make_loader(n=n, shuffle=True, seed=1).epoch_indices(2).tolist()
        assert set(union) == set(full[: (n // world) * world])


def test_loader_options_and_errors():
    loader = make_loader(n=20, batch_size=8, drop_last=True, channels_last=True, dtype=torch.bfloat16)
    x, y = next(loader.iterate(0))
    assert len(loader) == 2 and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (8, 3, 4, 4)
    with pytest.raises(SoftshareError, match="start_batch"):
        loader.iterate(0, start_batch=3)
    with pytest.raises(SoftshareError, match="no batches"):
        make_loader(n=5, batch_size=8, drop_last=True)
    with pytest.raises(SoftshareError, match="mean and std"):
        BatchLoader(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4), MEAN, STD)
    with pytest.raises(SoftshareError, match="rank"):
        make_loader(rank=2, world_size=2)
