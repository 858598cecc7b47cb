"""Trie-constrained beam search and ancestral sampling with a KV cache.

Each batch runs the prompt once; the cache is then repeated to ``B * beams`` (or ``B * n``) rows and the
``L`` levels are decoded with :func:`~gflowgr_core.decoding.step.constrained_step`, reordering the cache by
beam parent on the device. The loops have one Python iteration per SID level, never per beam or per user,
and the level loop itself does not synchronise with the host (the prompt pass does once per batch, to
validate the history and size the prompt).

A prompt is as wide as the longest real history of its batch, so beam search batches users of similar
history length together (``sort_by_length``) and returns the rows in the caller's order: the same
rankings as batching in the given order, with far less padding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import backends
from ..model.packing import PackingUnsupported, attention_mask_for
from ..sid.trie import Trie
from .step import OP as _STEP_OP, constrained_step

__all__ = ["DecodeResult", "SampleResult", "beam_search", "beam_search_scorings", "sample", "recommend",
           "leaves_to_items"]

_NEG_INF = float("-inf")
log = logging.getLogger("gflowgr")


@dataclass
class DecodeResult:
    """Result of :func:`beam_search`.

    Attributes:
        items: ``LongTensor[B, k]`` distinct recommended items, best first; ``-1`` where fewer than ``k``
            valid items were found.
        scores: ``FloatTensor[B, k]`` their SID scores (sum of per-level log-probs), ``-inf`` for ``-1`` slots.
        leaves: ``LongTensor[B, beams]`` final trie leaf of each beam, best first; ``-1`` for dead beams.
        leaf_scores: ``FloatTensor[B, beams]`` beam scores, ``-inf`` for dead beams.
        backend: the ``constrained_step`` backend that ran.
    """

    items: torch.Tensor
    scores: torch.Tensor
    leaves: torch.Tensor
    leaf_scores: torch.Tensor
    backend: str


@dataclass
class SampleResult:
    """Result of :func:`sample`.

    Attributes:
        items: ``LongTensor[B, n]`` sampled items (with shared SIDs: uniform among the leaf's items).
        log_probs: ``FloatTensor[B, n]`` log-probability of each sampled SID under the policy at
            temperature 1 (renormalised over trie children when ``renormalize``).
        codes: ``LongTensor[B, n, L]`` the sampled SIDs.
        leaves: ``LongTensor[B, n]`` their trie leaves.
        backend: the ``constrained_step`` backend that ran.
    """

    items: torch.Tensor
    log_probs: torch.Tensor
    codes: torch.Tensor
    leaves: torch.Tensor
    backend: str


def _take(order: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.gather(1, order) for t in tensors]


def leaves_to_items(trie: Trie, leaves: torch.Tensor, leaf_scores: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` items of scored leaves, ranked by score, then by item id.

    A leaf holding several items (shared SIDs) contributes all of them with the leaf's score; ``-1`` leaves
    and ``-inf`` scores contribute nothing. Items are distinct when the leaves are.

    Args:
        trie: the catalogue trie.
        leaves: ``LongTensor[B, W]`` leaf nodes (``-1`` = none).
        leaf_scores: ``FloatTensor[B, W]``.
        k: number of items to return.
    Returns:
        ``(items[B, k], scores[B, k])``; missing slots are ``-1`` / ``-inf``.
    """
    B = leaves.shape[0]
    items, valid = trie.items_of_leaves(leaves)  # [B, W, M]
    scores = leaf_scores.float()[:, :, None].expand_as(items)
    valid = valid & (scores > _NEG_INF)
    items, scores, valid = items.reshape(B, -1), scores.reshape(B, -1), valid.reshape(B, -1)
    # Three stable sorts, least significant key first: item id asc, score desc, valid first.
    order = torch.sort(items, dim=1, stable=True).indices
    items, scores, valid = _take(order, items, scores, valid)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    items, scores, valid = _take(order, items, scores, valid)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    items, scores, valid = _take(order, items, scores, valid)
    width = items.shape[1]
    if width < k:
        pad = k - width
        items = torch.cat([items, items.new_full((B, pad), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((B, pad), _NEG_INF)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(B, pad)], dim=1)
    items, scores, valid = items[:, :k], scores[:, :k], valid[:, :k]
    return (torch.where(valid, items, torch.full_like(items, -1)),
            torch.where(valid, scores, torch.full_like(scores, _NEG_INF)))


def _check(policy, trie: Trie, history: torch.Tensor) -> torch.Tensor:
    if tuple(policy.codes_per_level) != tuple(trie.codes_per_level):
        raise ValueError(f"policy codes_per_level {tuple(policy.codes_per_level)} and trie codes_per_level "
                         f"{tuple(trie.codes_per_level)} differ")
    history = torch.as_tensor(history)
    if history.dim() != 2:
        raise ValueError(f"history must be [B, H], got shape {tuple(history.shape)}")
    return history


def _per_batch(policy, history: torch.Tensor, batch_size: int, progress: bool | None, desc: str, run_batch) -> list:
    """``run_batch(chunk)`` for each ``batch_size`` users of ``history`` in turn (moved to the policy's device),
    with the policy in eval mode and a ``desc`` progress bar over the batches: the list of their results."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, history.shape[0], batch_size)
    # progress=None: tqdm decides (a bar on a terminal, none in a log file).
    bar = tqdm(starts, desc=desc, unit="batch", disable=None if progress is None else not progress,
               total=len(starts))
    with _EvalMode(policy):
        return [run_batch(history[start:start + batch_size].to(policy.device)) for start in bar]


class _EvalMode:
    """Puts a module in eval mode and under ``no_grad`` for a block, restoring its mode afterwards."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.module.train(self.was_training)
        return False


class _CopiedBeams:
    """Beam cache rows the simple way (the reference): every beam owns a copy of its prompt's cache, and the
    rows are reordered by parent beam at every level. Scoring ``s`` owns rows ``[s * b * beams, (s+1) * b * beams)``.
    """

    def __init__(self, policy, state, b: int, beams: int):
        self.policy, self.state, self.b, self.beams = policy, state, b, beams

    def hidden(self, s: int, level: int) -> torch.Tensor:
        if level == 0:  # every scoring reads the b prompt rows
            return self.state.last_hidden
        n = self.b * self.beams
        return self.state.last_hidden[s * n:(s + 1) * n]

    def append(self, level: int, parent: torch.Tensor, code: torch.Tensor) -> None:
        """Extend every scoring's beams: ``parent`` / ``code`` ``[S, b, beams]``, parents in ``[0, rows_in)``."""
        S, b, beams = parent.shape
        rows_in = 1 if level == 0 else beams
        device = parent.device
        first = torch.zeros(S, device=device, dtype=torch.long) if level == 0 else \
            torch.arange(S, device=device) * (b * beams)
        rows = first[:, None, None] + torch.arange(b, device=device)[None, :, None] * rows_in + parent
        self.state = self.policy.reorder_state(self.state, rows.reshape(-1))
        self.state = self.policy.extend_codes(self.state, code.reshape(-1), level)


class _BeamTree:
    """Beam cache rows without copies: each user's row keeps one copy of its prompt and the beams' code tokens
    are appended side by side, a tree whose 4D mask shows every token the prompt and its own ancestors
    (:meth:`~gflowgr_core.model.policy.SIDPolicy.extend_beam_tree`). The same hidden states as
    :class:`_CopiedBeams`, with a cache of ``P + (L-1)·S·beams`` columns per user instead of ``S·beams`` rows
    of ``P + L - 1``, and no reordering.
    """

    def __init__(self, policy, state, b: int, beams: int):
        self.policy, self.state, self.b, self.beams = policy, state, b, beams
        self.prompt = state.attention_mask.bool()  # [b, P]
        self.last = state.last_hidden              # level 0: [b, d]; after an append: [b, S, beams, d]
        self.ancestors = None                      # [b, M, A]: which appended columns each beam descends from

    def hidden(self, s: int, level: int) -> torch.Tensor:
        if level == 0:
            return self.last
        return self.last[:, s].reshape(self.b * self.beams, -1)

    def append(self, level: int, parent: torch.Tensor, code: torch.Tensor) -> None:
        S, b, beams = parent.shape
        M, device = S * beams, parent.device
        own = torch.eye(M, dtype=torch.bool, device=device).expand(b, M, M)
        if self.ancestors is None:  # level 0: the parents are the prompt itself
            self.ancestors = own
        else:  # parent slot of scoring s's beam j among the previous level's M tokens: s * beams + parent
            slot = (parent + torch.arange(S, device=device)[:, None, None] * beams).permute(1, 0, 2).reshape(b, M)
            inherited = self.ancestors.gather(1, slot[:, :, None].expand(b, M, self.ancestors.shape[2]))
            self.ancestors = torch.cat([inherited, own], dim=2)
        visible = torch.cat([self.prompt[:, None, :].expand(b, M, self.prompt.shape[1]), self.ancestors], dim=2)
        codes = code.permute(1, 0, 2).reshape(b, M)
        self.last = self.policy.extend_beam_tree(self.state, codes, level, visible).reshape(b, S, beams, -1)


def _beam_cache(policy, shared_prompt: bool):
    """:class:`_BeamTree` where the model takes 4D masks, else (or when not wanted) :class:`_CopiedBeams`."""
    if not shared_prompt:
        return _CopiedBeams
    try:
        attention_mask_for(policy.model, torch.ones(1, 1, 1, dtype=torch.bool), torch.float32)
    except PackingUnsupported as exc:
        if type(policy.model).__name__ not in _tree_fallback_logged:
            _tree_fallback_logged.add(type(policy.model).__name__)
            log.info("beam search copies the prompt cache per beam: %s", exc)
        return _CopiedBeams
    return _BeamTree


_tree_fallback_logged: set[str] = set()


def _beam_batch(policy, trie: Trie, history: torch.Tensor, beams: int, k: int, scorings: tuple[bool, ...],
                backend: str, shared_prompt: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """One prompt pass, then one beam search per scoring (``renormalize`` flag) in the same level loop; each
    level runs one forward over the beams of all scorings (``shared_prompt``: see :class:`_BeamTree`)."""
    state = policy.encode_prompt(history)
    b = history.shape[0]
    S, L = len(scorings), trie.num_levels
    device = policy.device
    cache = _beam_cache(policy, shared_prompt)(policy, state, b, beams)
    # Level 0: one live beam per user (all copies would be identical), expanded by the step to `beams`.
    node = torch.zeros(S, b, dtype=torch.long, device=device)
    scores = torch.zeros(S, b, 1, device=device)
    for level in range(L):
        weight, bias = policy.level_head_weight(level), policy.level_head_bias(level)
        steps = [constrained_step(cache.hidden(s, level), weight, node[s], level, trie, "beam", scores=scores[s],
                                  beams=beams, renormalize=renormalize, bias=bias, backend=backend)
                 for s, renormalize in enumerate(scorings)]
        scores = torch.stack([step.score for step in steps])
        node = torch.stack([step.next_node.reshape(-1) for step in steps])
        if level + 1 < L:
            cache.append(level, torch.stack([step.parent.reshape(b, beams) for step in steps]),
                         torch.stack([step.code.reshape(b, beams) for step in steps]))
    out = []
    for s in range(S):
        leaves = node[s].reshape(b, beams)
        items, item_scores = leaves_to_items(trie, leaves, scores[s], k)
        out.append((items, item_scores, leaves, scores[s]))
    return out


def beam_search(policy, trie: Trie, history: torch.Tensor, beams: int = 20, topk: int | None = None,
                batch_size: int = 256, renormalize: bool = True, backend: str = "auto",
                progress: bool | None = False, sort_by_length: bool = True,
                shared_prompt: bool = True) -> DecodeResult:
    """Trie-constrained beam search: the top-``k`` distinct catalogue items per user.

    Args:
        policy: a :class:`~gflowgr_core.model.policy.SIDPolicy`.
        trie: the catalogue trie (moved to the policy's device if elsewhere).
        history: ``LongTensor[N, H]`` item ids, left-padded with ``-1``.
        beams: beam width (``20`` in the evaluation protocol).
        topk: items to return per user (default ``beams``; with shared SIDs more than ``beams`` items can
            be returned, since one leaf expands to all its items).
        batch_size: users per prompt batch (the cache holds ``batch_size * beams`` rows).
        renormalize: score with log-probs renormalised over the trie children of each prefix (``True``), or
            with the level's log-probs (log-softmax over all ``K_l`` codes of the level) masked to the
            children (``False``): the ranking of Hugging Face beam search with a ``prefix_allowed_tokens_fn``
            over the level's tokens.
        backend: ``constrained_step`` backend (``"auto"``, ``"torch"``, ...).
        progress: show a tqdm bar over batches (``None``: only on a terminal).
        sort_by_length: batch users by number of real history items (rows come back in the given order);
            ``False`` batches them in the given order (the reference: same rankings, more padding).
        shared_prompt: keep one copy of each prompt's KV cache and append the beams' tokens as a tree under a
            4D mask (models whose attention takes no 4D mask fall back by themselves); ``False`` copies the
            prompt cache into every beam and reorders it at each level (the reference: same rankings).
    Returns:
        :class:`DecodeResult` with ``items/scores [N, k]`` and ``leaves/leaf_scores [N, beams]``. Every
        returned item's SID is in the catalogue; dead beams (fewer SIDs than beams) give ``-1``.
    """
    return beam_search_scorings(policy, trie, history, (renormalize,), beams=beams, topk=topk,
                                batch_size=batch_size, backend=backend, progress=progress,
                                sort_by_length=sort_by_length, shared_prompt=shared_prompt)[0]


def beam_search_scorings(policy, trie: Trie, history: torch.Tensor, renormalize: Sequence[bool] = (False, True),
                         *, beams: int = 20, topk: int | None = None, batch_size: int = 256,
                         backend: str = "auto", progress: bool | None = False,
                         sort_by_length: bool = True, shared_prompt: bool = True) -> list[DecodeResult]:
    """:func:`beam_search` under several scorings at once: one :class:`DecodeResult` per ``renormalize`` flag.

    Each prompt batch is encoded once and the searches share one forward per level (the cache then holds
    ``batch_size * beams * len(renormalize)`` rows). Result ``i`` equals
    ``beam_search(..., renormalize=renormalize[i])``. Other arguments are those of :func:`beam_search`.
    """
    history = _check(policy, trie, history)
    scorings = tuple(bool(r) for r in renormalize)
    if not scorings:
        raise ValueError("renormalize must name at least one scoring (True or False)")
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    k = beams if topk is None else int(topk)
    if k < 1:
        raise ValueError(f"topk must be >= 1, got {k}")
    device = policy.device
    trie = trie.to(device)
    name = backends.resolve_backend(_STEP_OP, backend, device).name
    N = history.shape[0]
    order = None
    if sort_by_length and N > batch_size:
        # Stable, so users of equal length keep their relative order.
        order = torch.sort((history >= 0).sum(1), stable=True).indices
        history = history[order]
    outs = _per_batch(policy, history, batch_size, progress, "beam search",
                      lambda chunk: _beam_batch(policy, trie, chunk, beams, k, scorings, name, shared_prompt))
    if not outs:
        empty_l = torch.empty(0, k, dtype=torch.long, device=device)
        return [DecodeResult(empty_l, torch.empty(0, k, device=device),
                             torch.empty(0, beams, dtype=torch.long, device=device),
                             torch.empty(0, beams, device=device), name) for _ in scorings]
    results = []
    for s in range(len(scorings)):
        parts = [torch.cat(p) for p in zip(*(batch[s] for batch in outs))]
        if order is not None:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(N, device=order.device)
            inverse = inverse.to(device)
            parts = [p.index_select(0, inverse) for p in parts]
        results.append(DecodeResult(*parts, name))
    return results


def _sample_batch(policy, trie: Trie, history: torch.Tensor, n: int, temperature: float,
                  generator: torch.Generator | None, renormalize: bool, backend: str):
    state = policy.encode_prompt(history)
    b = history.shape[0]
    L = trie.num_levels
    state = policy.expand_state(state, n)
    R = b * n
    node = torch.zeros(R, dtype=torch.long, device=policy.device)
    logp = torch.zeros(R, device=policy.device)
    codes = []
    for level in range(L):
        step = constrained_step(state.last_hidden, policy.level_head_weight(level), node, level, trie, "sample",
                                temperature=temperature, generator=generator, renormalize=renormalize,
                                bias=policy.level_head_bias(level), backend=backend)
        logp = logp + step.logp
        node = step.next_node
        codes.append(step.code)
        if level + 1 < L:
            state = policy.extend_codes(state, step.code, level)
    items, valid = trie.items_of_leaves(node)  # [R, M]
    if trie.max_items_per_leaf > 1:
        count = valid.sum(-1)
        u = torch.rand(R, device=policy.device, generator=generator)
        pick = (u * count).long().clamp(max=trie.max_items_per_leaf - 1)
        item = items.gather(1, pick[:, None]).squeeze(1)
    else:
        item = items[:, 0]
    return (item.reshape(b, n), logp.reshape(b, n), torch.stack(codes, dim=-1).reshape(b, n, L),
            node.reshape(b, n))


def sample(policy, trie: Trie, history: torch.Tensor, n: int = 1, temperature: float = 1.0,
           seed: int | None = None, *, generator: torch.Generator | None = None, batch_size: int = 256,
           renormalize: bool = True, backend: str = "auto", progress: bool = False) -> SampleResult:
    """Trie-constrained ancestral sampling of ``n`` SIDs per user (every sample is a catalogue item).

    Args:
        policy: a :class:`~gflowgr_core.model.policy.SIDPolicy`.
        trie: the catalogue trie.
        history: ``LongTensor[N, H]`` item ids, left-padded with ``-1``.
        n: samples per user (independent, with replacement).
        temperature: logits are divided by it before sampling.
        seed: seeds a generator on the policy's device (same seed and batch_size → same samples); ignored
            when ``generator`` is given; ``None`` with no generator uses the global RNG.
        generator: explicit ``torch.Generator`` on the policy's device.
        batch_size: users per prompt batch.
        renormalize: see :func:`beam_search`.
        backend: ``constrained_step`` backend.
        progress: show a tqdm bar over batches.
    Returns:
        :class:`SampleResult` (``items/log_probs/leaves [N, n]``, ``codes [N, n, L]``).
    """
    history = _check(policy, trie, history)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = policy.device
    trie = trie.to(device)
    name = backends.resolve_backend(_STEP_OP, backend, device).name
    if generator is None and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    L = trie.num_levels
    outs = _per_batch(policy, history, batch_size, progress, "sampling",
                      lambda chunk: _sample_batch(policy, trie, chunk, n, temperature, generator, renormalize, name))
    if not outs:
        return SampleResult(torch.empty(0, n, dtype=torch.long, device=device), torch.empty(0, n, device=device),
                            torch.empty(0, n, L, dtype=torch.long, device=device),
                            torch.empty(0, n, dtype=torch.long, device=device), name)
    items, log_probs, codes, leaves = (torch.cat(parts) for parts in zip(*outs))
    return SampleResult(items, log_probs, codes, leaves, name)


def recommend(policy, trie: Trie, split, k: int = 10, beams: int = 20, batch_size: int = 256,
              renormalize: bool = True, backend: str = "auto", progress: bool = True) -> DecodeResult:
    """Beam-search recommendations for every row of a split (``Split.history [N, H]``), with a progress bar.

    Returns the :class:`DecodeResult` of :func:`beam_search` with ``topk = k`` (rows in the split's order).
    """
    history = getattr(split, "history", None)
    if not isinstance(history, torch.Tensor):
        raise TypeError(f"split must have a history tensor [N, H] (a data.split.Split), got {type(split).__name__}")
    return beam_search(policy, trie, history, beams=beams, topk=k, batch_size=batch_size,
                       renormalize=renormalize, backend=backend, progress=progress)
