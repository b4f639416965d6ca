"""--dataset imagefolder: scanning, the crop geometry against independent computations, sharding,
bad files, training on a tiny generated ImageFolder (one process and 2-process gloo DDP)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softshare.checkpoint import load_checkpoint
from softshare.data.imagefolder import (
    ImageFolderDataset,
    ImageFolderLoader,
    ShardedBatchSampler,
    random_resized_crop_box,
    resize_centre_crop_box,
    scan_split,
)
from softshare.errors import SoftshareError
from softshare.evaluate import evaluate_checkpoint
from softshare.train.config import resolve_config
from softshare.train.loop import StopFlag, scale_lr, train

FASHION = Path("/usr/share/datasets/fashion-mnist")


def source_images(per_class: int, classes=(1, 7, 8, 3)) -> dict[int, np.ndarray]:
    """28x28 grey images per class: Fashion-MNIST (trouser, sneaker, bag, dress) where installed, else digits."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.stack([np.asarray(Image.fromarray((im * 16).clip(0, 255).astype(np.uint8)).resize((28, 28)))
                      for im in digits.images])
        y = digits.target
    return {c: x[np.flatnonzero(y == c)[:per_class]] for c in classes}


def make_imagefolder(root: Path, train: int = 48, val: int = 16, size: int = 40) -> Path:
    """4 classes x (train + val) RGB JPEGs (quality 90), `size` px square."""
    for c, images in source_images(train + val).items():
        for split, part in (("train", images[:train]), ("val", images[train:])):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(part):
                Image.fromarray(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(
                    folder / f"img_{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


TINY = dict(dataset="imagefolder", model="swrn_26_1_2", model_args={"base_width": 8}, image_size=32, batch_size=16,
            epochs=12, lr=0.05, warmup_epochs=1.0, schedule="cosine", weight_decay=5e-4, workers=1, device="cpu")


def tiny_config(tmp_path: Path, root: Path, **overrides):
    return resolve_config(overrides={**TINY, "data_root": str(root), "out_dir": str(tmp_path), "name": "run",
                                     **overrides})


# ------------------------------------------------------------------------------------- scanning


def test_scan_sorted_classes_labels_and_clear_errors(folder, tmp_path):
    train = scan_split(folder, "train")
    assert train.classes == ("class_1", "class_3", "class_7", "class_8")  # sorted names, not creation order
    assert len(train) == 4 * 48 and np.bincount(train.labels).tolist() == [48] * 4
    assert train.path(0) == folder / "train" / "class_1" / "img_000.JPEG"
    assert all(train.path(i).parent.name == train.classes[train.labels[i]] for i in range(0, len(train), 7))

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "train" / "class_9").mkdir()
    with pytest.raises(SoftshareError, match=r"class_9 holds no images"):
        scan_split(bad, "train")
    (bad / "train" / "class_9" / "a.JPEG").write_bytes((folder / "train/class_1/img_000.JPEG").read_bytes())
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


@pytest.mark.parametrize("args,message", [
    (["--data-root", "/nonexistent/imagenet"], "does not exist"),
    ([], "needs --data-root"),
])
def test_cli_bad_root_is_one_line_exit_2(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "softshare", "train", "--dataset", "imagefolder", "--model",
                          "resnet_26", "--out-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------- geometry


def test_random_resized_crop_box_follows_torchvision_distribution():
    import random

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


def test_sharded_sampler_partitions_each_epoch_and_resumes(folder):
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


def test_batches_do_not_depend_on_worker_count(folder):
    split = scan_split(folder, "train")
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


def add_bad_files(root: Path) -> dict[str, str]:
    """Real ImageNet's troubles: CMYK and PNG files named .JPEG, grey JPEGs (all decodable), and
    a truncated JPEG, garbage and an empty file (not). Returns name -> 'ok' | 'bad'."""
    good = root / "train" / "class_1" / "img_000.JPEG"
    data = good.read_bytes()
    rgb = Image.open(good).convert("RGB")
    kinds = {}
    for split in ("train", "val"):
        folder = root / split / "class_3"
        rgb.convert("CMYK").save(folder / "cmyk.JPEG", format="JPEG", quality=95)
        rgb.save(folder / "png_named.JPEG", format="PNG")
        rgb.convert("L").save(folder / "grey.JPEG", quality=95)
        (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
        (folder / "garbage.JPEG").write_bytes(os.urandom(3000))
        (folder / "empty.JPEG").write_bytes(b"")
        for name, kind in (("cmyk", "ok"), ("png_named", "ok"), ("grey", "ok"), ("truncated", "bad"),
                           ("garbage", "bad"), ("empty", "bad")):
            kinds[f"{split}/class_3/{name}.JPEG"] = kind
    return kinds


def test_bad_files_are_decoded_or_skipped_counted_and_logged(folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    kinds = add_bad_files(root)
    val = ImageFolderDataset(scan_split(root, "val", scan_split(root, "train").classes), train=False, size=40)
    # the same validation transform of the RGB original the odd files were made from
    reference = ImageFolderDataset(scan_split(root, "train"), train=False, size=40).load(0, 0).astype(float)
    for name in ("cmyk", "png_named"):  # decoded as what they are, not as their suffix says
        index = next(i for i in range(len(val.split)) if val.split.path(i).name == f"{name}.JPEG")
        image, label, skipped = val[(0, index)]
        assert skipped == [] and label == val.split.classes.index("class_3")
        assert np.abs(image.astype(float) - reference).mean() < 4

    result = train(tiny_config(tmp_path, root, epochs=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad = sorted(name for name, kind in kinds.items() if kind == "bad")
    assert [r["train_skipped_files"] for r in rows] == [3, 3] and [r["val_skipped_files"] for r in rows] == [3, 3]
    assert rows[-1]["val_count"] == 4 * 16 + 3  # the decodable odd files are scored, the broken ones not
    log = (tmp_path / "run" / "train.log").read_text()
    skip_lines = [line for line in log.splitlines() if "unreadable" in line]
    assert len(skip_lines) == 4  # once per split and epoch
    assert "epoch 1: 3 unreadable training file(s)" in log and "3 unreadable validation file(s)" in log
    assert all(name in log for name in bad)
    assert not any(name in log for name, kind in kinds.items() if kind == "ok")
    assert result.epochs_done == 2


# ------------------------------------------------------------------------------------- training


def test_tiny_imagefolder_trains_well_above_chance(folder, tmp_path):
    result = train(tiny_config(tmp_path, folder))
    assert result.final_metrics["val_acc"] >= 0.55  # 4 classes: chance 0.25
    assert result.final_metrics["val_count"] == 64
    classes = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert classes["classes"] == ["class_1", "class_3", "class_7", "class_8"] and classes["train_images"] == 192
    scored = evaluate_checkpoint(str(tmp_path / "run"), device="cpu", batch_size=10)  # softshare eval: best
    assert scored["count"] == 64 and scored["acc"] == pytest.approx(result.best_metric, abs=1e-12)


class StopAfter(StopFlag):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.remaining = steps

    @property
    def requested(self) -> bool:
        self.remaining -= 1
        return self.remaining < 0

    @requested.setter
    def requested(self, value) -> None:
        pass


def test_resume_mid_epoch_gives_identical_weights(folder, tmp_path):
    straight = train(tiny_config(tmp_path / "a", folder, epochs=2, deterministic=True))
    stopped = train(tiny_config(tmp_path / "b", folder, epochs=2, deterministic=True), stop=StopAfter(16))
    assert stopped.interrupted
    state = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last").train_state
    assert (state["epoch"], state["batch"]) == (1, 5)  # 12 batches per epoch
    resumed = train(tiny_config(tmp_path / "b", folder, epochs=2, deterministic=True), resume="auto")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_run_ends_with_identical_weights(folder, tmp_path):
    script = tmp_path / "ddp_job.py"
    overrides = {**TINY, "data_root": str(folder), "out_dir": str(tmp_path), "name": "ddp", "epochs": 2,
                 "batch_size": 8, "lr": 0.05, "lr_reference_batch": 8}
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from softshare.train.config import resolve_config
        from softshare.train.loop import train
        result = train(resolve_config(overrides={overrides!r}))
        rank = int(os.environ["RANK"])
        torch.save({{k: v.clone() for k, v in result.model.state_dict().items()}}, {str(tmp_path)!r} + f"/w{{rank}}.pt")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in (0, 1))
    assert [k for k in w0 if not torch.equal(w0[k], w1[k])] == []
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_count"] == 64  # sharded, counts all-reduced
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["lr"] == pytest.approx(0.1) and config["lr_reference_batch"] == 0  # 0.05 x (8 x 2) / 8


def test_imagenet_presets_and_linear_lr_scaling():
    for name, model in (("imagenet_swrn_50_2_2", "swrn_50_2_2"), ("imagenet_wrn_50_2", "wrn_50_2")):
        c = resolve_config(name)
        assert (c.model, c.dataset, c.epochs, c.lr_milestones, c.lr_gamma, c.weight_decay, c.nesterov) == \
            (model, "imagefolder", 90, [30, 60, 80], 0.1, 1e-4, True)
        assert (c.image_size, c.amp, c.channels_last, c.optimizer, c.batch_size) == (224, "auto", True, "sgd", 256)
        eight = scale_lr(c, 8)  # 8 GPUs x 256 = 2048 images per step
        assert eight.lr == pytest.approx(0.8) and eight.lr_reference_batch == 0
    assert resolve_config("imagenet_wrn_50_2", overrides={"label_smoothing": 0.1}).label_smoothing == 0.1


def test_benchmark_smoke(tmp_path):
    """benchmarks/bench_imagefolder.py at a tiny size, so the script cannot rot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_imagefolder", Path(__file__).parents[1] / "benchmarks" /
                                                  "bench_imagefolder.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.make_jpegs(tmp_path, 8)
    sizes = {Image.open(p).size for p in tmp_path.rglob("*.JPEG")}
    assert sizes == {(500, 375), (375, 500)}
    results = bench.measure(tmp_path, rounds=1, workers=0, batch=4)
    assert set(results) == {"decode_only", "train_transform", "val_transform", "dataloader_0_workers"}
    assert all(v > 0 for v in results.values())
