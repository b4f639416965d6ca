"""data/imagefolder.py: scanning, the crop geometry against independent computations, sharding,
worker-count independence, and bad files decoded or skipped (the training side of --dataset
imagefolder is in test_train_imagefolder.py)."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import add_bad_files
from softshare.data.imagefolder import (
    ImageFolderDataset,
    ImageFolderLoader,
    ShardedBatchSampler,
    random_resized_crop_box,
    resize_centre_crop_box,
    scan_split,
)
from softshare.errors import SoftshareError


# ------------------------------------------------------------------------------------- scanning


def test_scan_sorted_classes_labels_and_clear_errors(imagefolder, tmp_path):
    train = scan_split(imagefolder, "train")
    assert train.classes == ("class_1", "class_3", "class_7", "class_8")  # sorted names, not creation order
    assert len(train) == 4 * 48 and np.bincount(train.labels).tolist() == [48] * 4
    assert train.path(0) == imagefolder / "train" / "class_1" / "img_000.JPEG"
    assert all(train.path(i).parent.name == train.classes[train.labels[i]] for i in range(0, len(train), 7))

    bad = tmp_path / "bad"
    shutil.copytree(imagefolder, bad)
    (bad / "train" / "class_9").mkdir()
    with pytest.raises(SoftshareError, match=r"class_9 holds no images"):
        scan_split(bad, "train")
    (bad / "train" / "class_9" / "a.JPEG").write_bytes((imagefolder / "train/class_1/img_000.JPEG").read_bytes())
    with pytest.raises(SoftshareError, match=r"training split's 5 classes; missing \['class_9'\]"):
        scan_split(bad, "val", scan_split(bad, "train").classes)
    shutil.rmtree(bad / "val")
    with pytest.raises(SoftshareError, match=r"val is missing"):
        scan_split(bad, "val")
    with pytest.raises(SoftshareError, match=r"does not exist"):
        scan_split(tmp_path / "nowhere", "train")
    (tmp_path / "file").write_text("")
    with pytest.raises(SoftshareError, match=r"is not a directory"):
        scan_split(tmp_path / "file", "train")


# ------------------------------------------------------------------------------------- geometry


def test_random_resized_crop_box_follows_torchvision_distribution():
    rng = random.Random(0)
    boxes = [random_resized_crop_box(500, 375, rng) for _ in range(4000)]
    areas = np.array([w * h / (500 * 375) for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert all(0 <= x and 0 <= y and x + w <= 500 and y + h <= 375 for x, y, w, h in boxes)
    assert areas.min() >= 0.075 and areas.max() <= 1.0 and ratios.min() >= 0.74 and ratios.max() <= 1.34
    assert 0.40 < areas.mean() < 0.58  # uniform on [0.08, 1] minus rejected large crops
    assert random_resized_crop_box(500, 375, random.Random(5)) == random_resized_crop_box(500, 375, random.Random(5))
    # fallback for an extreme aspect: centre crop at the largest allowed ratio
    assert random_resized_crop_box(1000, 10, random.Random(0), scale=(0.99, 1.0)) == (493, 0, 13, 10)


def photo(size: tuple[int, int] | None = None) -> Image.Image:
    from sklearn.datasets import load_sample_images

    image = Image.fromarray(load_sample_images().images[0])  # china.jpg, 640x427
    return image.resize(size, Image.Resampling.BICUBIC) if size else image


def test_validation_crop_matches_resize_then_centre_crop(tmp_path):
    """One resize over the crop box == torchvision's Resize(256) then CenterCrop(224), up to resampling."""
    root = tmp_path / "one"
    (root / "val" / "a").mkdir(parents=True)
    photo().save(root / "val" / "a" / "x.JPEG", quality=95)
    ours = ImageFolderDataset(scan_split(root, "val"), train=False, size=224).load(0, 0).astype(float)
    with Image.open(root / "val" / "a" / "x.JPEG") as image:
        w, h = image.size
        resized = image.convert("RGB").resize((round(w * 256 / h), 256), Image.Resampling.BILINEAR)  # h is shorter
    left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
    reference = np.asarray(resized.crop((left, top, left + 224, top + 224))).astype(float)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - reference).mean() < 2.0  # measured 0.49; the box one resized pixel off scores 9.4
    assert resize_centre_crop_box(500, 375, 256, 224) == ((500 - 328.125) / 2, (375 - 328.125) / 2, 328.125, 328.125)


def test_draft_decoding_of_large_jpegs_matches_full_decoding(tmp_path):
    root = tmp_path / "big"
    (root / "val" / "a").mkdir(parents=True)
    photo((2000, 1334)).save(root / "val" / "a" / "x.JPEG", quality=90)
    dataset = ImageFolderDataset(scan_split(root, "val"), train=False, size=224)
    drafted = dataset.load(0, 0).astype(float)
    with Image.open(root / "val" / "a" / "x.JPEG") as image:
        full = image.convert("RGB")
    box = resize_centre_crop_box(2000, 1334, 256, 224)
    reference = np.asarray(full.resize((224, 224), Image.Resampling.BILINEAR,
                                       box=(box[0], box[1], box[0] + box[2], box[1] + box[3]))).astype(float)
    assert np.abs(drafted - reference).mean() < 3.0


# ------------------------------------------------------------------------------------- sharding


def test_sharded_sampler_partitions_each_epoch_and_resumes():
    n, world = 103, 3
    samplers = [ShardedBatchSampler(n, 8, True, seed=1, rank=r, world_size=world) for r in range(world)]
    per_rank = [s.indices(4) for s in samplers]
    flat = [i for part in per_rank for i in part]
    assert len(flat) == len(set(flat)) == n // world * world  # disjoint, the same count on every rank
    assert {len(p) for p in per_rank} == {34} and {len(s) for s in samplers} == {4}
    assert samplers[0].indices(4) != samplers[0].indices(5)  # a new order every epoch
    val = [ShardedBatchSampler(n, 8, False, rank=r, world_size=world) for r in range(world)]
    assert sorted(i for s in val for batch in s for _, i in batch) == list(range(n))  # each exactly once
    s = samplers[1]
    s.epoch, s.start_batch = 7, 0
    full = list(s)
    s.start_batch = 2
    assert list(s) == full[2:] and all(e == 7 for batch in full for e, _ in batch)


def test_batches_do_not_depend_on_worker_count(imagefolder):
    split = scan_split(imagefolder, "train")
    batches = []
    for workers in (0, 2):
        loader = ImageFolderLoader(split, train=True, batch_size=16, size=32, seed=3, workers=workers)
        batches.append([(x.clone(), y.clone()) for x, y in loader.iterate(2)])
    assert len(batches[0]) == 12
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x, y = batches[0][0]
    assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    # normalised with ImageNet's mean/std: grey clothes on black give mostly -mean/std
    assert torch.allclose(x.amin((0, 2, 3)), -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


# ------------------------------------------------------------------------------------- bad files


def test_odd_files_decode_and_broken_ones_are_skipped_and_named(imagefolder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(imagefolder, root)
    kinds = add_bad_files(root)
    classes = scan_split(root, "train").classes
    val = ImageFolderDataset(scan_split(root, "val", classes), train=False, size=40)
    train = ImageFolderDataset(scan_split(root, "train"), train=True, size=40)
    # the same validation transform of the RGB original the odd files were made from
    reference = ImageFolderDataset(scan_split(root, "train"), train=False, size=40).load(0, 0).astype(float)

    def index(dataset: ImageFolderDataset, name: str) -> int:
        return next(i for i in range(len(dataset.split)) if dataset.split.path(i).name == f"{name}.JPEG")

    for name in ("cmyk", "png_named"):  # decoded as what they are, not as their suffix says
        image, label, skipped = val[(0, index(val, name))]
        assert skipped == [] and label == classes.index("class_3")
        assert np.abs(image.astype(float) - reference).mean() < 4
    for name in (n.split("/")[-1][:-5] for n, kind in kinds.items() if kind == "bad" and n.startswith("val/")):
        image, label, skipped = val[(0, index(val, name))]  # validation leaves it out
        assert image is None and label == -1 and len(skipped) == 1 and f"{name}.JPEG" in skipped[0]
        i = index(train, name)  # training takes the next readable sample in its place
        image, label, skipped = train[(0, i)]
        assert image is not None and image.shape == (40, 40, 3) and f"{name}.JPEG" in skipped[0]
