"""Which layers sharing a bank have become the same layer: |cos| of coefficient vectors.

One definition each of the three notions the rest of softshare builds on:
- `abs_cosine`: S_ij = |<a_i, a_j>| / (|a_i| |a_j|), the Layer Similarity Matrix entry;
- a layer's *role*: its name among the direct children of its block (``conv1``), and a *run*
  of consecutive blocks with the same shared roles drawing from one bank (`block_runs`): the
  layers of one role in a run are what `softshare.fold` merges into one looped layer
  (`foldable_pairs`: the same pairs read from recorded layer names, for histories without a model);
- `recurrence_penalty`: the training pull of exactly those pairs towards collinearity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import SoftshareError
from ..layers import SharedLayer, TemplateBank, named_banks


def abs_cosine(vectors: Tensor) -> Tensor:
    """(..., n, n) |cos| between the n vectors of (..., n, k) `vectors`; a zero vector scores 0."""
    norms = vectors.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, vectors / norms.clamp_min(1e-300), torch.zeros_like(vectors))
    return (unit @ unit.transpose(-1, -2)).abs()


@dataclass
class LayerSimilarity:
    """S_ij = |<a_i, a_j>| / (|a_i| |a_j|) over the coefficient vectors of one bank's layers."""

    bank: str
    layers: list[str]
    matrix: torch.Tensor  # (n_layers, n_layers), float64
    coefficients: torch.Tensor | None = None  # (n_layers, k) float64: the vectors compared (how they move in training)

    @property
    def scales(self) -> list[float] | None:
        """A bank of one template: each layer's coefficient, its scale c_i (the matrix is all ones
        by construction, so the scales are what there is to see); None for k > 1 or unknown."""
        if self.coefficients is None or self.coefficients.shape[1] != 1:
            return None
        return self.coefficients[:, 0].tolist()

    def to_dict(self) -> dict:
        record = {"bank": self.bank, "layers": self.layers, "matrix": self.matrix.tolist()}
        if self.coefficients is not None:
            record["coefficients"] = self.coefficients.tolist()
        return record

    @classmethod
    def from_dict(cls, record: dict) -> LayerSimilarity:
        coefficients = record.get("coefficients")
        return cls(record["bank"], record["layers"], torch.tensor(record["matrix"], dtype=torch.float64),
                   None if coefficients is None else torch.tensor(coefficients, dtype=torch.float64))


def layer_similarity(model: nn.Module) -> list[LayerSimilarity]:
    """One LayerSimilarity per bank, layers in module (forward) order. A zero vector scores 0."""
    results = []
    for bank_name, _, users in named_banks(model):
        coefficients = torch.stack([layer.coefficients.detach().to("cpu", torch.float64) for _, layer in users])
        results.append(LayerSimilarity(bank_name, [name for name, _ in users], abs_cosine(coefficients), coefficients))
    return results


@dataclass
class FoldSite:
    """A maximal run of consecutive blocks (children of one ModuleList/Sequential) whose direct
    children include the same shared layer roles, each role drawing from the same bank in every
    block: one bank for all roles (SWRN) or one bank per role (the algorithmic shared body)."""

    container: str  # module name of the ModuleList/Sequential, e.g. "stages.0.blocks"
    start: int  # index of the first block in the container
    blocks: list[nn.Module]
    roles: tuple[str, ...]
    banks: tuple[TemplateBank, ...]  # per role

    def coefficients(self) -> Tensor:
        """(blocks, roles, k) float64 coefficient vectors, on the CPU."""
        return torch.stack([
            torch.stack([getattr(block, role).coefficients.detach().to("cpu", torch.float64)
                         for role in self.roles])
            for block in self.blocks])


def shared_roles(block: nn.Module) -> tuple[tuple[str, ...], tuple[TemplateBank, ...]]:
    """A block's roles (names of its direct children that are shared layers) and their banks."""
    children = [(name, child) for name, child in block.named_children() if isinstance(child, SharedLayer)]
    return tuple(name for name, _ in children), tuple(child.bank for _, child in children)


def block_runs(model: nn.Module) -> list[FoldSite]:
    """Every run of consecutive blocks with the same roles on the same banks, in module (forward) order."""
    sites: list[FoldSite] = []
    for container_name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        run: FoldSite | None = None
        for index, block in enumerate(container):
            roles, banks = shared_roles(block)
            if not roles:
                run = None
                continue
            if run is not None and run.roles == roles and all(a is b for a, b in zip(run.banks, banks)):
                run.blocks.append(block)
            else:
                run = FoldSite(container_name, index, [block], roles, banks)
                sites.append(run)
    return sites


def foldable_pairs(layers: list[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of `layers` (one bank's layer names, as the LSM records them) that a fold
    needs collinear: the same role in consecutive blocks, ``<container>.<b>.<role>`` and
    ``<container>.<b+1>.<role>`` (a SWRN stage's ``blocks.1.conv1`` with ``blocks.2.conv1``, not
    with ``blocks.1.conv2``). Names without a block index pair with nothing."""
    index = {}
    for i, name in enumerate(layers):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2].isdigit():
            index[(".".join(parts[:-2]), int(parts[-2]), parts[-1])] = i
    return [(i, index[(container, block + 1, role)]) for (container, block, role), i in index.items()
            if (container, block + 1, role) in index]


def recurrence_penalty(model: nn.Module, reach: int = 1, signed: bool = False) -> torch.Tensor:
    """Differentiable pull towards recurrence: mean of 1 - cos^2 over foldable pairs.

    The pairs are layers of the same role in blocks 1 to `reach` apart within a run (`block_runs`:
    what `fold` collapses into a loop), not all pairs: a block's conv1 and conv2 stay free to
    differ. With reach 1 (consecutive blocks) a net can satisfy it by turning its direction a
    little at every block, which a fold (every pair within a loop similar) cuts into short loops;
    a longer reach asks for directions that stay put over `reach` blocks. cos^2 rather than |cos|
    keeps the gradient smooth, and like the LSM it ignores sign and scale (a fold keeps a
    per-iteration scale). `signed` takes 1 - cos instead: layers W and -W are as far apart as
    possible, so a run that folds is one step repeated, not a step whose sign flips from
    iteration to iteration (a folded loop repeats its last step beyond the trained iterations).
    """
    if isinstance(reach, bool) or not isinstance(reach, int) or reach < 1:
        raise SoftshareError(f"reach must be a positive integer (blocks apart), got {reach!r}")
    terms = []
    for site in block_runs(model):
        for role in site.roles:
            if len(site.blocks) > 1:
                vectors = torch.stack([getattr(block, role).coefficients for block in site.blocks])
                unit = torch.nn.functional.normalize(vectors, dim=1)
                for gap in range(1, min(reach, len(site.blocks) - 1) + 1):
                    cos = (unit[:-gap] * unit[gap:]).sum(1)
                    terms.append(1 - cos if signed else 1 - cos.pow(2))
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.cat(terms).mean()
