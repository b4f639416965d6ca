"""Algorithmic task data: every generated maze checked against independent computations, files,
loaders (ours and the public benchmark's formats), and the `softshare data` CLI."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from softshare.data.tasks import (generate_mazes, generate_prefix_sums, image_side, load_mazes,
                             load_prefix_sums, maze_dataset, maze_dir, prefix_sum_dataset,
                             prefix_sum_dir, prefix_sum_inputs, save_mazes, save_prefix_sums)
from softshare.data.tasks import mazes as maze_module
from softshare.errors import SoftshareError

WHITE, BLACK, GREEN, RED = (1, 1, 1), (0, 0, 0), (0, 1, 0), (1, 0, 0)


# ---------------------------------------------------------------- independent maze checks

def decode(inputs: np.ndarray, solutions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Check border and 2x2 upscaling; return grid colours (B, 3, m, m) and path grid (B, m, m)."""
    batch, m = len(inputs), size + 2
    side = 2 * m + 2
    assert inputs.shape == (batch, 3, side, side) and inputs.dtype == np.uint8
    assert solutions.shape == (batch, side, side) and solutions.dtype == np.uint8
    for image in (inputs, solutions):
        for edge in (image[..., 0, :], image[..., -1, :], image[..., :, 0], image[..., :, -1]):
            assert not edge.any(), "1-pixel border must be black / off-path"
    blocks = inputs[..., 1:-1, 1:-1].reshape(batch, 3, m, 2, m, 2)
    grid = blocks[:, :, :, 0, :, 0]
    assert (blocks == grid[:, :, :, None, :, None]).all(), "every grid pixel must be a 2x2 block"
    path_blocks = solutions[:, 1:-1, 1:-1].reshape(batch, m, 2, m, 2)
    path = path_blocks[:, :, 0, :, 0]
    assert (path_blocks == path[:, :, None, :, None]).all()
    return grid, path


def distances(open_: np.ndarray, source: np.ndarray) -> np.ndarray:
    """BFS distance (4-neighbour, through open pixels) from the `source` pixel of each grid; -1 if unreached."""
    dist = np.where(source, 0, -1)
    frontier = source.copy()
    step = 0
    while frontier.any():
        step += 1
        grown = np.zeros_like(frontier)
        grown[:, 1:] |= frontier[:, :-1]
        grown[:, :-1] |= frontier[:, 1:]
        grown[:, :, 1:] |= frontier[:, :, :-1]
        grown[:, :, :-1] |= frontier[:, :, 1:]
        frontier = grown & open_ & (dist < 0)
        dist[frontier] = step
    return dist


def check_mazes(inputs: np.ndarray, solutions: np.ndarray, size: int) -> None:
    """Assert every maze is a perfect maze with its unique start-end path as the label."""
    grid, path = decode(inputs, solutions, size)
    batch, n = len(grid), (size + 1) // 2
    colours = grid.transpose(0, 2, 3, 1)
    white, black, green, red = (np.all(colours == c, axis=-1) for c in (WHITE, BLACK, GREEN, RED))
    assert (white | black | green | red).all(), "only white, black, green and red pixels"
    assert (green.sum((1, 2)) == 1).all() and (red.sum((1, 2)) == 1).all(), "one start, one end"
    open_ = ~black
    odd_r, odd_c = np.meshgrid(np.arange(size + 2) % 2 == 1, np.arange(size + 2) % 2 == 1, indexing="ij")
    assert open_[:, odd_r & odd_c].all(), "every cell is open (start and end are cells)"
    assert not open_[:, ~odd_r & ~odd_c].any(), "wall posts and the outer ring are walls"
    passages = open_[:, odd_r ^ odd_c].sum(1)
    assert (passages == n * n - 1).all(), "a spanning tree of n*n cells has n*n - 1 passages"
    from_start = distances(open_, green)
    assert (from_start[open_] >= 0).all(), "the maze is connected"
    from_end = distances(open_, red)
    length = from_start[red]  # (B,)
    unique_path = open_ & (from_start + from_end == length[:, None, None])
    assert np.array_equal(path.astype(bool), unique_path), "label is the unique start-end path"
    on = path.astype(bool)
    degree = np.zeros(on.shape, int)
    degree[:, 1:] += on[:, :-1]
    degree[:, :-1] += on[:, 1:]
    degree[:, :, 1:] += on[:, :, :-1]
    degree[:, :, :-1] += on[:, :, 1:]
    ends = green | red
    assert (degree[on & ends] == 1).all() and (degree[on & ~ends] == 2).all(), "a simple 4-neighbour path"
    assert (on.sum((1, 2)) == length + 1).all()


@pytest.mark.parametrize("size, count", [(9, 400), (11, 300), (13, 300), (33, 200), (59, 100)])
def test_every_maze_is_perfect_with_its_unique_path(size, count):
    inputs, solutions = generate_mazes(count, size, seed=size)
    check_mazes(inputs, solutions, size)


def test_batches_split_and_join_correctly(monkeypatch):
    monkeypatch.setattr(maze_module, "_CELL_BUDGET", 7 * 25)  # 7 size-9 mazes per batch
    calls = []
    inputs, solutions = generate_mazes(20, 9, seed=1, progress=calls.append)
    assert calls == [7, 7, 6]
    check_mazes(inputs, solutions, 9)
    assert len({x.tobytes() for x in inputs}) == 20


@pytest.mark.slow
def test_largest_public_and_beyond_sizes():
    for size, count in ((201, 3), (401, 1)):
        check_mazes(*generate_mazes(count, size, seed=0), size)


def test_image_sides_match_public_benchmark():
    assert [image_side(s) for s in (9, 13, 59)] == [24, 32, 124]
    assert generate_mazes(2, 13)[0].shape == (2, 3, 32, 32)


def test_start_and_end_uniform_over_distinct_cells():
    inputs, _ = generate_mazes(20000, 9, seed=7)
    grid = inputs[:, :, 1:-1:2, 1:-1:2][:, :, 1::2, 1::2]  # (N, 3, 5, 5) cell colours
    green = np.all(grid.transpose(0, 2, 3, 1) == GREEN, axis=-1).reshape(-1, 25)
    red = np.all(grid.transpose(0, 2, 3, 1) == RED, axis=-1).reshape(-1, 25)
    assert (green.sum(1) == 1).all() and (red.sum(1) == 1).all() and not (green & red).any()
    expected = 20000 / 25
    for counts in (green.sum(0), red.sum(0)):
        assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def reference_backtracker(n: int, rng: random.Random) -> tuple[list[set[int]], int, int]:
    """Plain recursive backtracker (as in the public generator): adjacency, start, end."""
    start, end = rng.sample(range(n * n), 2)
    adjacent: list[set[int]] = [set() for _ in range(n * n)]
    seen, stack = {start}, [start]
    while stack:
        cell = stack[-1]
        r, c = divmod(cell, n)
        free = [(r + dr) * n + c + dc for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0))
                if 0 <= r + dr < n and 0 <= c + dc < n and (r + dr) * n + c + dc not in seen]
        if not free:
            stack.pop()
            continue
        nxt = rng.choice(free)
        adjacent[cell].add(nxt)
        adjacent[nxt].add(cell)
        seen.add(nxt)
        stack.append(nxt)
    return adjacent, start, end


def test_maze_statistics_match_a_plain_recursive_backtracker():
    """Same law as the textbook algorithm: compare path length and dead ends (DFS mazes have long
    corridors and few dead ends, unlike e.g. Prim or Kruskal mazes)."""
    size, count, n = 13, 3000, 7
    inputs, solutions = generate_mazes(count, size, seed=11)
    ours_length = solutions[:, 1:-1:2, 1:-1:2].sum((1, 2))  # path pixels in the grid
    cells = inputs[:, 0, 1:-1:2, 1:-1:2] | inputs[:, 1, 1:-1:2, 1:-1:2]  # open grid
    links = (cells[:, 1:-1:2, 2:-1:2].astype(int), cells[:, 2:-1:2, 1:-1:2].astype(int))
    degree = np.zeros((count, n, n), int)
    degree[:, :, :-1] += links[0]
    degree[:, :, 1:] += links[0]
    degree[:, :-1, :] += links[1]
    degree[:, 1:, :] += links[1]
    ours_dead = (degree == 1).sum((1, 2))

    rng = random.Random(0)
    ref_length, ref_dead = [], []
    for _ in range(count):
        adjacent, start, end = reference_backtracker(n, rng)
        parent, queue = {start: start}, [start]
        for cell in queue:
            for nxt in adjacent[cell] - parent.keys():
                parent[nxt] = cell
                queue.append(nxt)
        hops, cell = 0, end
        while cell != start:
            cell, hops = parent[cell], hops + 1
        ref_length.append(2 * hops + 1)
        ref_dead.append(sum(len(a) == 1 for a in adjacent))
    for ours, ref in ((ours_length, np.array(ref_length)), (ours_dead, np.array(ref_dead))):
        se = np.sqrt(ours.var() / count + ref.var() / count)
        assert abs(ours.mean() - ref.mean()) < 5 * se, (ours.mean(), ref.mean())


def test_mazes_deterministic_per_seed_and_split():
    a = generate_mazes(50, 9, seed=3)
    b = generate_mazes(50, 9, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], generate_mazes(50, 9, seed=4)[0])
    assert not np.array_equal(a[0], generate_mazes(50, 9, seed=3, split="test")[0])


@pytest.mark.parametrize("kwargs", [dict(size=8), dict(size=7), dict(size=403), dict(size=9.0),
                                    dict(count=0), dict(count=-5), dict(seed=-1), dict(split="val")])
def test_bad_maze_arguments_raise(kwargs):
    args = dict(count=10, size=9, seed=0, split="train") | kwargs
    with pytest.raises(SoftshareError):
        generate_mazes(**args)


# ---------------------------------------------------------------- prefix sums

def test_prefix_sums_distinct_below_24_bits_and_running_parity():
    bits, targets = generate_prefix_sums(1024, 10, seed=0)  # every 10-bit string exactly once
    assert bits.shape == targets.shape == (1024, 10) and bits.dtype == targets.dtype == np.uint8
    values = (bits.astype(np.int64) << np.arange(10)).sum(1)
    assert sorted(values) == list(range(1024))
    assert np.array_equal(targets, np.cumsum(bits, axis=1) % 2)
    bits, _ = generate_prefix_sums(5000, 20, seed=1)
    assert len(np.unique(bits, axis=0)) == 5000


def test_prefix_sums_long_strings_are_fair_bits():
    bits, targets = generate_prefix_sums(4000, 64, seed=2)
    assert abs(bits.mean() - 0.5) < 0.01
    assert np.array_equal(targets, np.cumsum(bits, axis=1) % 2)
    assert np.array_equal(bits, generate_prefix_sums(4000, 64, seed=2)[0])
    assert not np.array_equal(bits, generate_prefix_sums(4000, 64, seed=3)[0])


@pytest.mark.parametrize("count, length", [(17, 4), (0, 32), (5, 0), (2 ** 23 + 1, 23)])
def test_bad_prefix_sum_arguments_raise(count, length):
    with pytest.raises(SoftshareError):
        generate_prefix_sums(count, length)


def test_prefix_sum_inputs_are_centred():
    x = prefix_sum_inputs(np.array([[0, 1, 1]], np.uint8))
    assert x.dtype == torch.float32 and x.shape == (1, 1, 3)
    assert x.tolist() == [[[-0.5, 0.5, 0.5]]]


# ---------------------------------------------------------------- files and loaders

def test_maze_files_round_trip_and_dataset_helper(tmp_path):
    inputs, solutions = generate_mazes(30, 9, seed=5, split="test")
    path = save_mazes(tmp_path, "test", 9, inputs, solutions)
    assert path == tmp_path / "maze_data_test_9"
    x, y = load_mazes(tmp_path, "test", 9)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), inputs) and np.array_equal(y.numpy(), solutions)
    x2, y2 = maze_dataset(9, 30, split="test", seed=5)  # generated in memory: same data
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = maze_dataset(9, 12, split="test", root=tmp_path)
    assert torch.equal(x3, x[:12])
    with pytest.raises(SoftshareError, match="holds 30"):
        maze_dataset(9, 31, split="test", root=tmp_path)


def test_loads_public_benchmark_files(tmp_path):
    inputs, solutions = generate_mazes(10, 11, seed=0)
    folder = tmp_path / "maze_data_train_11"
    folder.mkdir()
    np.save(folder / "inputs.npy", inputs.astype(np.float64))  # the public files are float64
    np.save(folder / "solutions.npy", solutions.astype(np.float64))
    x, y = load_mazes(tmp_path, "train", 11)
    assert np.array_equal(x.numpy(), inputs) and np.array_equal(y.numpy(), solutions)

    bits, targets = generate_prefix_sums(50, 18, seed=0)
    folder = prefix_sum_dir(tmp_path, 18)
    folder.mkdir(parents=True)
    torch.save(torch.from_numpy(bits).float(), folder / "18_data.pth")
    torch.save(torch.from_numpy(targets).float(), folder / "18_targets.pth")
    x, y = load_prefix_sums(tmp_path, 18)
    assert x.shape == (50, 1, 18) and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(bits).float().unsqueeze(1) - 0.5)
    assert np.array_equal(y.numpy(), targets)


def test_prefix_sum_files_round_trip_and_dataset_helper(tmp_path):
    bits, targets = generate_prefix_sums(40, 32, seed=9)
    save_prefix_sums(tmp_path, 32, bits, targets)
    x, y = load_prefix_sums(tmp_path, 32)
    x2, y2 = prefix_sum_dataset(32, 40, seed=9)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(prefix_sum_dataset(32, 5, root=tmp_path)[1], y[:5])


def _write_maze_files(folder, inputs, solutions):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "inputs.npy", inputs)
    np.save(folder / "solutions.npy", solutions)


@pytest.mark.parametrize("defect, message", [
    ("missing", "not found"), ("garbage", "cannot read"), ("shape", "expected"),
    ("count", "to match"), ("values", "0 or 1"), ("dtype", "dtype int64"),
])
def test_bad_maze_files_raise_naming_the_file(tmp_path, defect, message):
    inputs, solutions = generate_mazes(4, 9)
    folder = maze_dir(tmp_path, "train", 9)
    if defect == "garbage":
        _write_maze_files(folder, inputs, solutions)
        (folder / "solutions.npy").write_bytes(b"not a numpy file")
    elif defect == "shape":
        _write_maze_files(folder, inputs[:, :, :20, :20], solutions)
    elif defect == "count":
        _write_maze_files(folder, inputs, solutions[:3])
    elif defect == "values":
        solutions[0, 5, 5] = 2
        _write_maze_files(folder, inputs, solutions)
    elif defect == "dtype":
        _write_maze_files(folder, inputs.astype(np.int64), solutions)
    with pytest.raises(SoftshareError, match=message) as info:
        load_mazes(tmp_path, "train", 9)
    assert str(folder) in str(info.value) and "softshare data mazes" in str(info.value)


def test_bad_prefix_sum_files_raise(tmp_path):
    folder = prefix_sum_dir(tmp_path, 16)
    with pytest.raises(SoftshareError, match="16_data.npy not found"):
        load_prefix_sums(tmp_path, 16)
    folder.mkdir(parents=True)
    torch.save({"not": "a tensor"}, folder / "16_data.pth")
    torch.save(torch.zeros(3, 16), folder / "16_targets.pth")
    with pytest.raises(SoftshareError, match="not a tensor"):
        load_prefix_sums(tmp_path, 16)
    torch.save(torch.zeros(3, 15), folder / "16_data.pth")
    with pytest.raises(SoftshareError, match=r"16_data.pth has shape \(3, 15\)"):
        load_prefix_sums(tmp_path, 16)


def test_saving_rejects_non_byte_arrays(tmp_path):
    inputs, solutions = generate_mazes(2, 9)
    with pytest.raises(SoftshareError, match="uint8"):
        save_mazes(tmp_path, "train", 9, inputs.astype(np.float32), solutions)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- CLI
