"""The training examples of one step and their trajectories: what samplers read and return, the reward
scores, the policy encodes and the stages hand to the losses.

A training example (one row of the training split) has a prompt (its history), a positive (its logged target
item) and, when the packed forward shares a user's history, a trunk window: :class:`ExampleBatch` holds ``B``
of them. It has ``T`` trajectories: the positive item's SID first, then the sampler's candidates
(augmentations or negatives). Trajectory ``t`` of example ``b`` ends in item ``items[b, t]`` through the codes
``codes[b, t, 0..L-1]``. :class:`Trajectories` is a regular ``[B, T]`` grid because every example of a step
gets the same number of candidates; the flat views (``[B*T, ...]``, what the objectives take) and the example
each flat trajectory belongs to are properties.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ExampleBatch", "Trajectories"]


@dataclass(frozen=True)
class ExampleBatch:
    """``B`` training examples: rows of the training split, their prompts, positives and trunk windows.

    What a sampler draws candidates for (:meth:`gflowgr_core.samplers.Sampler.sample`), what the trainer
    hands its stage (:meth:`gflowgr_core.train.stages.Stage.draw`), and what :class:`Trajectories` extends
    with the items and codes of each example's trajectories. Shapes are not checked here: each consumer
    checks what it reads and raises its own error type (a sampler a ``SamplerError``).

    Attributes:
        example: ``LongTensor[B]`` training-split row of each example (what ``CMScorer`` and
            :class:`~gflowgr_core.samplers.UserItems` key on).
        history: ``LongTensor[B, H]`` item ids of each example's prompt, left-padded with ``-1``.
        positive: ``LongTensor[B]`` the logged target item of each example.
        window: ``LongTensor[B]`` trunk-window ids for the packed forward
            (:func:`gflowgr_core.data.windows.trunk_windows`), or ``None`` (no history shared).
    """

    example: torch.Tensor
    history: torch.Tensor
    positive: torch.Tensor
    window: Optional[torch.Tensor] = None

    @classmethod
    def from_split(cls, split, example: torch.Tensor, window: Optional[torch.Tensor] = None) -> "ExampleBatch":
        """Rows ``example[B]`` of a ``Split`` (``history[N, H]``, ``target[N]``), on the split's device.

        ``window`` is the rows' trunk-window ids (already indexed by ``example``), or ``None``.
        """
        example = torch.as_tensor(example, dtype=torch.long)
        rows = example.to(split.target.device)
        # index_select rather than advanced indexing: the latter is slow on the CPU.
        return cls(example=example, history=split.history.index_select(0, rows),
                   positive=split.target.index_select(0, rows), window=window)

    @property
    def size(self) -> int:
        """``B``."""
        return int(self.positive.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        """The positives' device (the batch's)."""
        return self.positive.device

    def to(self, device) -> "ExampleBatch":
        """Every tensor on ``device``."""
        window = None if self.window is None else self.window.to(device)
        return ExampleBatch(self.example.to(device), self.history.to(device), self.positive.to(device), window)

    def subset(self, rows: torch.Tensor) -> "ExampleBatch":
        """The examples at batch rows ``rows`` (``LongTensor[B']``)."""
        window = None if self.window is None else self.window[rows]
        return ExampleBatch(self.example[rows], self.history[rows], self.positive[rows], window)


@dataclass(frozen=True)
class Trajectories:
    """``T`` trajectories per example for ``B`` examples.

    Attributes:
        example: ``LongTensor[B]`` training-split row of each example (what the collaborative scorer reads).
        history: ``LongTensor[B, H]`` item ids of each example's prompt (``-1`` = no item).
        items: ``LongTensor[B, T]`` the item each trajectory ends in; ``items[:, 0]`` is the positive.
        codes: ``LongTensor[B, T, L]`` the SID codes of ``items``.
        window: ``LongTensor[B]`` trunk-window ids for the packed forward
            (:func:`gflowgr_core.data.windows.trunk_windows`), or ``None`` (no history shared).
    """

    example: torch.Tensor
    history: torch.Tensor
    items: torch.Tensor
    codes: torch.Tensor
    window: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # Shape checks only: they need no host sync, so building trajectories costs nothing on a GPU.
        if self.items.dim() != 2 or self.items.shape[1] == 0:
            raise ValueError(f"items must be [B, T] with T >= 1, got {tuple(self.items.shape)}")
        B, T = self.items.shape
        if self.codes.dim() != 3 or tuple(self.codes.shape[:2]) != (B, T):
            raise ValueError(f"codes must be [B={B}, T={T}, L], got {tuple(self.codes.shape)}")
        if tuple(self.example.shape) != (B,):
            raise ValueError(f"example must be [B={B}], got {tuple(self.example.shape)}")
        if self.history.dim() != 2 or self.history.shape[0] != B:
            raise ValueError(f"history must be [B={B}, H], got {tuple(self.history.shape)}")
        if self.window is not None and tuple(self.window.shape) != (B,):
            raise ValueError(f"window must be [B={B}] or None, got {tuple(self.window.shape)}")

    @classmethod
    def from_items(cls, example: torch.Tensor, history: torch.Tensor, positive: torch.Tensor,
                   candidates: Optional[torch.Tensor], item_codes: torch.Tensor,
                   window: Optional[torch.Tensor] = None) -> "Trajectories":
        """The positive of each example, then its ``candidates[B, n]`` (``None``: the positive alone).

        ``item_codes`` is the catalogue's ``LongTensor[n_items, L]`` on the items' device.
        """
        items = positive.unsqueeze(1)
        if candidates is not None:
            items = torch.cat([items, candidates.to(positive.device)], dim=1)
        # index_select rather than advanced indexing: the latter is slow on the CPU, and this runs every step.
        codes = item_codes.index_select(0, items.reshape(-1)).view(*items.shape, item_codes.shape[1])
        return cls(example=example, history=history, items=items, codes=codes, window=window)

    # ------------------------------------------------------------------------------------- sizes
    @property
    def num_examples(self) -> int:
        """``B``."""
        return int(self.items.shape[0])

    @property
    def per_example(self) -> int:
        """``T``: trajectories per example (the positive plus its candidates)."""
        return int(self.items.shape[1])

    @property
    def num_levels(self) -> int:
        """``L``: SID levels, one decision each."""
        return int(self.codes.shape[2])

    # ------------------------------------------------------------------------------------- views
    @property
    def positive(self) -> torch.Tensor:
        """``LongTensor[B]`` each example's positive item."""
        return self.items[:, 0]

    @property
    def candidates(self) -> torch.Tensor:
        """``LongTensor[B, T-1]`` the sampler's items (augmentations or negatives)."""
        return self.items[:, 1:]

    @property
    def is_positive(self) -> torch.Tensor:
        """``BoolTensor[B, T]``: the trajectory ends in its example's positive item."""
        return self.items == self.positive.unsqueeze(1)

    @property
    def trajectory_example(self) -> torch.Tensor:
        """``LongTensor[B*T]``: the batch row (``0..B-1``) of each flat trajectory."""
        rows = torch.arange(self.num_examples, device=self.items.device)
        return rows.repeat_interleave(self.per_example)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """A per-trajectory tensor ``x[B, T, ...]`` as ``[B*T, ...]`` (the objectives' layout)."""
        return x.reshape(self.num_examples * self.per_example, *x.shape[2:])

    def per_trajectory(self, x: torch.Tensor) -> torch.Tensor:
        """A per-example tensor ``x[B, ...]`` repeated to each of its trajectories, ``[B*T, ...]``."""
        return x.repeat_interleave(self.per_example, dim=0)

    @property
    def flat_codes(self) -> torch.Tensor:
        """``LongTensor[B*T, L]``."""
        return self.flat(self.codes)
