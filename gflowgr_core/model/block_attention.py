"""Block-sparse attention for packed rows: only the tiles of the mask that hold a visible pair are computed.

A packed row (:mod:`gflowgr_core.model.packing`) is block-diagonal over its segments, causal inside its trunk,
and an example's branch tokens see a trunk prefix and their own few tokens only, so most of its ``C x C``
mask is empty. A dense masked ``sdpa`` still computes every score. Here the row is cut into square tiles of
``tile`` tokens; :func:`block_plan` lists, for each query tile, the key tiles where its mask has at least one
visible pair, and groups the query tiles by how many key tiles they see. :func:`block_sparse_attention` then
runs one ``sdpa`` per group on the gathered tiles, with the mask restricted to them.

The result equals the dense masked attention up to float rounding: the skipped tiles hold no visible pair,
so they would contribute ``exp(-inf) = 0``, and every query sees at least itself. The plan depends only on the
mask, so it is built once per forward and shared by every layer, forward and backward.

It is plain softmax attention with a scale, nothing else: an attention layer that passes a sliding window
narrower than the packed row, logit soft-capping (``softcap``), attention sinks (``s_aux`` / ``sinks``) or an
additive position bias (``position_bias``) gets :class:`~gflowgr_core.model.packing.PackingUnsupported`
(:data:`UNSUPPORTED_KWARGS`) rather than an attention without them.

:func:`use_block_sparse` routes a Hugging Face model's attention through this op for one forward: the
model's ``config._attn_implementation`` names :data:`ATTENTION_NAME` meanwhile, and the plan reaches every
attention layer as the ``block_plan`` keyword argument, which HF decoders pass on to their attention function.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import PackingUnsupported

__all__ = ["BlockPlan", "block_plan", "block_sparse_attention", "dense_masked_attention", "use_block_sparse",
           "ATTENTION_NAME", "DEFAULT_TILE", "UNSUPPORTED_KWARGS"]

ATTENTION_NAME = "gflowgr_block_sparse"
DEFAULT_TILE = 32
#: Keyword arguments of Hugging Face attention layers that change the attention and that the block-sparse op
#: does not implement, with what they are. A layer that passes one of them with a value other than ``None`` (a
#: sliding window: narrower than the packed row) gets :class:`PackingUnsupported`.
UNSUPPORTED_KWARGS = {"sliding_window": "a sliding attention window", "softcap": "attention logit soft-capping",
                      "s_aux": "attention sinks", "sinks": "attention sinks",
                      "position_bias": "an additive position bias"}


@dataclass
class _Group:
    query_tiles: torch.Tensor  # LongTensor[G]: flat index (row * n_tiles + tile) of each query tile
    key_tiles: torch.Tensor    # LongTensor[G, n]: flat index of the n key tiles each of them sees
    mask: torch.Tensor         # [G, 1, tile, n * tile]: boolean, or additive in the compute dtype


@dataclass
class BlockPlan:
    """Which tiles of a packed mask :func:`block_sparse_attention` computes.

    Attributes:
        rows, length: the mask's ``R`` and ``C``; ``tile``: tile side; ``n_tiles``: tiles per row (the row
            padded up to a whole number of tiles).
        groups: query tiles grouped by the number of key tiles they see.
        query_order, key_order: the groups' query tiles and key tiles, concatenated (flat tile indices);
            query_sizes, key_sizes: each group's share of them.
        inverse: ``LongTensor[R * n_tiles]``: where each query tile's output lies in the groups' outputs
            concatenated.
        dense_tiles, computed_tiles: tile pairs of the dense mask and those computed (for reports).
    """

    rows: int
    length: int
    tile: int
    n_tiles: int
    groups: list
    query_order: torch.Tensor
    query_sizes: list
    key_order: torch.Tensor
    key_sizes: list
    inverse: torch.Tensor
    dense_tiles: int
    computed_tiles: int


def block_plan(allowed: torch.Tensor, tile: int = DEFAULT_TILE, additive_dtype: torch.dtype | None = None
               ) -> BlockPlan:
    """The :class:`BlockPlan` of ``allowed [R, C, C]`` (``allowed[r, j, i]``: query ``j`` may see key ``i``).

    Every query must see at least one key. ``C`` need not be a multiple of ``tile``: the rows are padded with
    tokens that see only themselves. ``additive_dtype``: give the groups' masks as ``0`` / dtype-minimum in that
    dtype (what the CPU's fused kernel reads without converting again per call) instead of booleans.
    """
    if allowed.dim() != 3 or allowed.shape[1] != allowed.shape[2] or allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a square boolean [R, C, C] mask, got {allowed.dtype} "
                         f"{tuple(allowed.shape)}")
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1")
    R, C, _ = allowed.shape
    blind = ~allowed.any(2)
    if bool(blind.any()):
        r, j = (int(i) for i in blind.nonzero()[0])
        raise ValueError(f"query {j} of row {r} sees no key: its attention is undefined")
    nt = -(-C // tile)
    pad = nt * tile - C
    if pad:
        allowed = F.pad(allowed, (0, pad, 0, pad))
        idx = torch.arange(C, nt * tile, device=allowed.device)
        allowed[:, idx, idx] = True
    # [R, qt, kt, tile, tile]: query tile qt against key tile kt.
    blocks = allowed.view(R, nt, tile, nt, tile).permute(0, 1, 3, 2, 4)
    live = blocks.any(4).any(3)                                        # [R, nt, nt]
    counts = live.sum(2).reshape(-1)                                   # [R * nt]
    flat_blocks = blocks.reshape(R * nt, nt, tile, tile)
    row_of = torch.arange(R, device=allowed.device).repeat_interleave(nt) * nt   # first tile of each row
    groups, order = [], []
    for n in torch.unique(counts).tolist():
        q = (counts == n).nonzero().squeeze(1)
        cols = live.reshape(R * nt, nt).index_select(0, q).nonzero()[:, 1].view(-1, n)   # ascending per query
        mask = flat_blocks.index_select(0, q)                           # [G, nt, tile, tile]
        mask = torch.gather(mask, 1, cols[:, :, None, None].expand(-1, -1, tile, tile))
        mask = mask.permute(0, 2, 1, 3).reshape(len(q), 1, tile, n * tile)
        if additive_dtype is not None:
            mask = torch.where(mask, torch.zeros((), dtype=additive_dtype, device=mask.device),
                               torch.finfo(additive_dtype).min)
        groups.append(_Group(query_tiles=q, key_tiles=cols + row_of.index_select(0, q)[:, None], mask=mask))
        order.append(q)
    query_order = torch.cat(order)
    inverse = torch.empty(R * nt, dtype=torch.long, device=allowed.device)
    inverse[query_order] = torch.arange(R * nt, device=allowed.device)
    return BlockPlan(rows=R, length=C, tile=tile, n_tiles=nt, groups=groups, query_order=query_order,
                     query_sizes=[len(q) for q in order],
                     key_order=torch.cat([g.key_tiles.reshape(-1) for g in groups]),
                     key_sizes=[g.key_tiles.numel() for g in groups], inverse=inverse,
                     dense_tiles=R * nt * nt, computed_tiles=int(counts.sum()))


def _tiles(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``[R, H, C, D]`` as ``[R * n_tiles, tile, H, D]`` (padded to whole tiles): token-major, the layout HF's
    projections produce, so that gathered tiles and their gradients stay contiguous."""
    R, H, C, D = x.shape
    x = x.transpose(1, 2)
    pad = plan.n_tiles * plan.tile - C
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(R * plan.n_tiles, plan.tile, H, D)


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: BlockPlan, *,
                           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Masked attention of ``query [R, H, C, D]`` over ``key``/``value [R, H, C, D]`` on the plan's tiles.

    Equals ``sdpa(query, key, value, attn_mask=allowed[:, None])`` for the mask the plan was built from (see
    :func:`dense_masked_attention`), up to float rounding. Returns ``[R, H, C, D]`` (a transposed view of a
    token-major tensor).
    """
    R, H, C, D = query.shape
    if (R, C) != (plan.rows, plan.length) or key.shape[:3] != query.shape[:3] or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} do "
                         f"not match a plan of {plan.rows} rows of {plan.length} tokens")
    t = plan.tile
    # One gather per input for all groups: its backward is then one scatter, not one per group.
    q = _tiles(query, plan).index_select(0, plan.query_order).split(plan.query_sizes)
    k = _tiles(key, plan).index_select(0, plan.key_order).split(plan.key_sizes)
    v = _tiles(value, plan).index_select(0, plan.key_order).split(plan.key_sizes)
    outs = []
    for g, qg, kg, vg in zip(plan.groups, q, k, v):
        G, n = g.key_tiles.shape
        mask = g.mask if g.mask.dtype == torch.bool else g.mask.to(query.dtype)
        og = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.view(G, n * t, H, -1).transpose(1, 2),
                                            vg.view(G, n * t, H, -1).transpose(1, 2), attn_mask=mask,
                                            dropout_p=dropout_p, scale=scale)
        outs.append(og.transpose(1, 2))                                 # [G, t, H, Dv]
    out = torch.cat(outs).index_select(0, plan.inverse)                # [R * nt, t, H, Dv]
    out = out.view(R, plan.n_tiles * t, H, -1)[:, :C]
    return out.transpose(1, 2)


def dense_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, *,
                           scale: float | None = None) -> torch.Tensor:
    """The reference of :func:`block_sparse_attention`: one ``sdpa`` over the whole boolean mask."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scale)


def _refuse_unsupported(module, plan: BlockPlan, kwargs: dict) -> None:
    """Raise :class:`PackingUnsupported` when the layer asks for an attention feature this op lacks.

    A sliding window of at least the row length cannot hide a key (a query and a key of one packed row are
    fewer than ``C`` columns, and positions, apart), so ignoring it is exact; a narrower one is refused.
    """
    found = []
    for name, what in UNSUPPORTED_KWARGS.items():
        value = kwargs.get(name)
        if value is None:
            continue
        if name == "sliding_window" and isinstance(value, int) and value >= plan.length:
            continue
        shown = f"{value!r}" if isinstance(value, (int, float, str)) else type(value).__name__
        found.append(f"{what} ({name}={shown})")
    if found:
        layer = type(module).__name__
        raise PackingUnsupported(
            f"{layer} passes {' and '.join(found)} to its attention function; the block-sparse packed attention "
            f"({ATTENTION_NAME!r}) implements plain scaled softmax attention only; train this model with "
            f"packing: false")


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  block_plan: BlockPlan | None = None, **kwargs):
    """The Hugging Face attention-function signature around :func:`block_sparse_attention`."""
    if block_plan is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} was called without a block_plan: it runs "
                           f"only inside use_block_sparse()")
    _refuse_unsupported(module, block_plan, kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = block_sparse_attention(query, key, value, block_plan, scale=scaling,
                                 dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _hf_attention)
        _registered = True


@contextmanager
def use_block_sparse(model):
    """Within this block ``model`` (an HF causal LM, or a PEFT wrapper of one) attends through
    :func:`block_sparse_attention`; pass the plan to its forward as ``block_plan=``. The model's own attention
    implementation is restored on exit, also after an error."""
    _register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
