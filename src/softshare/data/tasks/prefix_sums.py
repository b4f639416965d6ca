"""Prefix sums (running parity) of bit strings, as in the easy-to-hard benchmark.

Bits are least significant first. For lengths L < 24 the N strings are the binary digits of N
distinct integers drawn without replacement from [0, 2^L), so no string repeats and N <= 2^L;
longer strings are i.i.d. fair bits (repeats are then vanishingly rare). The target at position
i is the parity of bits 0..i. Models see the bits shifted to -0.5 / +0.5 (zero-mean inputs).
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import SoftshareError

DISTINCT_BELOW = 24  # lengths below this draw distinct integers, as the public generator does


MAX_COUNT = 10_000_000  # more is a typo, not a data set (and an allocation of count x length bytes)
MAX_LENGTH = 100_000


def check_prefix_sum_args(count: int, length: int, seed: int = 0) -> None:
    """Raise SoftshareError unless the arguments describe a prefix-sum set we can generate."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 < length <= MAX_LENGTH:
        raise SoftshareError(f"prefix-sum length must be a positive integer (the public lengths are "
                             f"16..64, 72, 128, 256, 512), got {length!r}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count <= MAX_COUNT:
        raise SoftshareError(f"prefix-sum count must be an integer from 1 to {MAX_COUNT:,}, got {count!r}")
    if length < DISTINCT_BELOW and count > 2 ** length:
        raise SoftshareError(f"only {2 ** length:,} distinct bit strings of length {length} exist, "
                             f"asked for {count:,}; lower the count or use a longer length")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SoftshareError(f"seed must be a non-negative integer, got {seed!r}")


def generate_prefix_sums(count: int, length: int, seed: int = 0, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` bit strings and their running parities: two uint8 (N, L) arrays in {0, 1}.

    Deterministic in (count, length, seed, stream). Stream 0 is what `softshare data` writes and
    what runs train and are tested on; other streams are independent draws (validation sets at
    lengths the run is also tested on).
    """
    check_prefix_sum_args(count, length, seed)
    rng = np.random.default_rng([seed, length] if stream == 0 else [seed, length, stream])
    if length < DISTINCT_BELOW:
        values = rng.choice(2 ** length, size=count, replace=False)
        bits = (values[:, None] >> np.arange(length) & 1).astype(np.uint8)
    else:
        bits = rng.integers(2, size=(count, length), dtype=np.uint8)
    return bits, np.bitwise_xor.accumulate(bits, axis=1)


def prefix_sum_inputs(bits: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Model input for (N, L) bits in {0, 1}: float32 (N, 1, L) in {-0.5, +0.5}."""
    return torch.as_tensor(bits).float().unsqueeze(1) - 0.5
