"""Maze solving, as in the easy-to-hard benchmark (Schwarzschild et al., 2021), generated fast.

A maze of size ``s`` (odd) has ``n = (s + 1) / 2`` cells per side. It is carved by randomised
depth-first search (recursive backtracker) started at the start cell, so it is a perfect maze: the
cells and passages form a spanning tree and the label, the path from start to end, is unique.

Encoding (identical to the public data): an ``(s + 2) x (s + 2)`` grid with the cells at odd
coordinates, the passages between them and an outer wall; open is white ``(1, 1, 1)``, wall black,
start green ``(0, 1, 0)``, end red ``(1, 0, 0)``. Every grid pixel becomes a 2x2 block and a
1-pixel black border is added, so images are ``2s + 6`` pixels a side. The target is the binary
mask of the path's pixels (cells and passages, start and end included), upscaled the same way.

Speed comes from stepping a whole batch of mazes in lockstep with numpy: each step every maze
either pushes a random unvisited neighbour or pops its stack, with no per-maze Python code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...errors import SoftshareError

MIN_SIZE = 9
MAX_SIZE = 401  # keeps one maze's search (2 n^2 lockstep steps) and image (~2 MB) reasonable
SPLITS = ("train", "test")
MAX_COUNT = 10_000_000  # ~23 GB of size-9 mazes; more is a typo, not a data set

_CELL_BUDGET = 1 << 20  # cells searched at once: mazes per batch = budget // n^2 (fixed per size)
_CHOICES = 12  # lcm(1, 2, 3, 4): r % k is uniform on 0..k-1 for r uniform on 0..11

Progress = Callable[[int], None]


def image_side(size: int) -> int:
    """Side of a size-`size` maze image: 2 (size + 2) grid pixels plus a 1-pixel border each side."""
    return 2 * size + 6


def check_maze_args(count: int, size: int, seed: int = 0, split: str = "train") -> None:
    """Raise SoftshareError unless the arguments describe a maze set we can generate."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size % 2 == 0 \
            or not MIN_SIZE <= size <= MAX_SIZE:
        raise SoftshareError(f"maze size must be an odd integer from {MIN_SIZE} to {MAX_SIZE}, "
                             f"got {size!r}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count <= MAX_COUNT:
        raise SoftshareError(f"maze count must be an integer from 1 to {MAX_COUNT:,}, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SoftshareError(f"seed must be a non-negative integer, got {seed!r}")
    if split not in SPLITS:
        raise SoftshareError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def generate_mazes(count: int, size: int, seed: int = 0, split: str = "train",
                   progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`count` mazes of size `size`: inputs uint8 (N, 3, H, W) in {0, 1}, solutions uint8 (N, H, W).

    Deterministic in (count, size, seed, split); `split` picks an independent random stream so a
    train and a test set drawn with the same seed differ. `progress(k)` is called after each batch
    of k mazes.
    """
    check_maze_args(count, size, seed, split)
    side = image_side(size)
    inputs = np.empty((count, 3, side, side), np.uint8)
    solutions = np.empty((count, side, side), np.uint8)
    fill_mazes(inputs, solutions, size, seed, split, progress)
    return inputs, solutions


def fill_mazes(inputs: np.ndarray, solutions: np.ndarray, size: int, seed: int = 0,
               split: str = "train", progress: Progress | None = None) -> None:
    """Generate ``len(inputs)`` mazes into preallocated arrays (e.g. memory-mapped .npy files).

    Same output as :func:`generate_mazes`, without holding a second copy of a large set.
    """
    count = len(inputs)
    check_maze_args(count, size, seed, split)
    side = image_side(size)
    if inputs.shape != (count, 3, side, side) or solutions.shape != (count, side, side):
        raise ValueError(f"expected arrays of shape {(count, 3, side, side)} and {(count, side, side)}, "
                         f"got {inputs.shape} and {solutions.shape}")
    n = (size + 1) // 2
    per_batch = max(1, _CELL_BUDGET // (n * n))
    for index, begin in enumerate(range(0, count, per_batch)):
        end = min(begin + per_batch, count)
        rng = np.random.default_rng([seed, SPLITS.index(split), size, index])
        _make_batch(end - begin, n, rng, inputs[begin:end], solutions[begin:end])
        if progress is not None:
            progress(end - begin)


def _make_batch(batch: int, n: int, rng: np.random.Generator,
                inputs: np.ndarray, solutions: np.ndarray) -> None:
    cells = n * n
    start = rng.integers(cells, size=batch)
    end = rng.integers(cells - 1, size=batch)
    end += end >= start  # uniform over ordered pairs of distinct cells
    parent = _carve(start, n, rng)
    pixel = _cell_pixels(n)
    grid_open, grid_path = _grids(parent, start, end, pixel, n)
    m = 2 * n + 1
    b = np.arange(batch)
    colour = np.repeat(grid_open[:, None], 3, axis=1)  # (B, 3, m*m): white where open
    colour[b, 0, pixel[start]] = colour[b, 2, pixel[start]] = 0  # start: green
    colour[b, 1, pixel[end]] = colour[b, 2, pixel[end]] = 0  # end: red
    _upscale(colour.reshape(batch, 3, m, m), inputs)
    _upscale(grid_path.reshape(batch, m, m), solutions)


def _carve(start: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Recursive backtracker from `start`, every maze of the batch stepping in lockstep.

    Returns each cell's parent in the search tree (the start is its own parent). The tree *is*
    the maze: a passage joins every cell to its parent.
    """
    batch, cells = len(start), n * n
    width = cells + 1  # column `cells` is a sentinel neighbour, permanently visited
    rows = np.arange(batch, dtype=np.int64) * width
    neighbours = _neighbour_table(n)  # (cells, 5): W, E, N, S, then the sentinel
    choice = _choice_table()
    visited = np.zeros(batch * width, bool)
    visited[rows + cells] = True
    visited[rows + start] = True
    parent = np.empty(batch * width, np.int64)
    parent[rows + start] = start
    stack = np.empty(batch * width, np.int64)
    stack[rows] = start
    top = rows.copy()  # flat index of each maze's stack top
    row5 = np.arange(batch, dtype=np.int64) * 5
    pushes = np.zeros(batch, np.int64)
    draws = rng.integers(_CHOICES, size=(2 * cells, batch), dtype=np.uint8)
    for step in range(2 * cells):
        if step % 32 == 0 and pushes.min() == cells - 1:
            break
        cur = stack[top]
        around = neighbours[cur]  # (B, 5)
        seen = visited[rows[:, None] + around[:, :4]]
        code = np.packbits(seen, axis=1, bitorder="little")[:, 0]
        direction = choice[code, draws[step]]
        new = around.ravel()[row5 + direction]  # the sentinel when stuck: its writes are harmless
        visited[rows + new] = True
        parent[rows + new] = cur
        stack[top + 1] = new
        moved = direction < 4
        top += moved * 2 - 1
        np.maximum(top, rows, out=top)  # finished mazes stay put at their start
        pushes += moved
    return parent.reshape(batch, width)[:, :cells]


def _neighbour_table(n: int) -> np.ndarray:
    """(n*n, 5) neighbour cell of each cell to the W, E, N, S, then the sentinel n*n."""
    cells = n * n
    r, c = np.divmod(np.arange(cells), n)
    table = np.full((cells, 5), cells, np.int64)
    table[c > 0, 0] = np.flatnonzero(c > 0) - 1
    table[c < n - 1, 1] = np.flatnonzero(c < n - 1) + 1
    table[r > 0, 2] = np.flatnonzero(r > 0) - n
    table[r < n - 1, 3] = np.flatnonzero(r < n - 1) + n
    return table


def _choice_table() -> np.ndarray:
    """choice[code, r]: the (r mod k)-th of the k unvisited directions in visited-bitmask `code`, or 4."""
    table = np.full((16, _CHOICES), 4, np.uint8)
    for code in range(16):
        free = [d for d in range(4) if not code >> d & 1]
        if free:
            table[code] = [free[r % len(free)] for r in range(_CHOICES)]
    return table


def _cell_pixels(n: int) -> np.ndarray:
    """Flat index of each cell's pixel in the (2n+1) x (2n+1) grid."""
    r, c = np.divmod(np.arange(n * n), n)
    return (2 * r + 1) * (2 * n + 1) + 2 * c + 1


def _grids(parent: np.ndarray, start: np.ndarray, end: np.ndarray, pixel: np.ndarray,
           n: int) -> tuple[np.ndarray, np.ndarray]:
    """Open-pixel and path-pixel grids, flat (B, m*m) uint8, from the search tree."""
    batch, m = len(parent), 2 * n + 1
    rows = np.arange(batch)[:, None] * (m * m)
    grid_open = np.zeros((batch, m * m), np.uint8)
    grid_open.reshape(batch, m, m)[:, 1::2, 1::2] = 1
    # a passage pixel lies midway between a cell's pixel and its parent's (flat indices average)
    grid_open.ravel()[rows + (pixel + pixel[parent]) // 2] = 1
    grid_path = np.zeros((batch, m * m), np.uint8)
    flat_parent = parent.ravel()
    base = np.arange(batch) * (n * n)
    cur = end.copy()
    for _ in range(n * n):  # walk end -> parent -> ... -> start (the root), all mazes at once
        up = flat_parent[base + cur]
        grid_path.ravel()[rows[:, 0] + pixel[cur]] = 1
        grid_path.ravel()[rows[:, 0] + (pixel[cur] + pixel[up]) // 2] = 1
        if np.array_equal(cur, start):
            break
        cur = up
    return grid_open, grid_path


def _upscale(grid: np.ndarray, out: np.ndarray) -> None:
    """Write each grid pixel as a 2x2 block inside a 1-pixel zero border: (..., m, m) -> (..., 2m+2, 2m+2)."""
    out[..., 0, :] = 0
    out[..., -1, :] = 0
    out[..., :, 0] = 0
    out[..., :, -1] = 0
    for dr in (1, 2):
        for dc in (1, 2):
            out[..., dr:-1:2, dc:-1:2] = grid
