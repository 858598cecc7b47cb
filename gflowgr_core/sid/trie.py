"""Prefix trie over a catalogue's semantic IDs, stored as flat device tensors.

Node numbering (see docs/ARCHITECTURE.md, conventions): nodes are numbered level by level; the root is
node 0 (level 0) and the nodes of level ``l`` (prefixes of length ``l``) occupy
``[level_offsets[l], level_offsets[l + 1])`` in lexicographic order of their prefixes. Children of a node
are contiguous and sorted by code, so edge ``e`` always leads to node ``e + 1``. Leaves are the level-``L``
nodes; several items share a leaf when their SIDs collide.

Two builders produce identical tensors: a vectorised PyTorch one (the reference, any device) and the C++
op ``torch.ops.gflowgr.trie_build`` (CPU, OpenMP) from the compiled extension.

All query methods are vectorised, run on CPU or CUDA tensors, never synchronise with the host and take
their output shapes from Python ints fixed at build time (so they can be captured in CUDA graphs).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .. import backends

__all__ = ["Trie", "DEFAULT_DENSE_MAX_ENTRIES"]

#: Largest dense child table (entries) built for a level; bigger levels use the CSR search only.
DEFAULT_DENSE_MAX_ENTRIES = 64 * 1024 * 1024

STATE_FORMAT = "gflowgr.trie/1"
FILE_NAME = "trie.pt"

# The tensors a builder produces; everything else is derived from them.
_CORE = ("level_offsets", "parent", "node_code", "indptr", "leaf_ptr", "leaf_items", "item_leaf")


def _validate_codes(codes: torch.Tensor, codes_per_level: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Check shape, dtype and code ranges; return ``(codes as int64, codes_per_level as ints)``."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor [n_items, L], got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must hold integers, got dtype {codes.dtype}")
    per_level = tuple(int(k) for k in codes_per_level)
    if not per_level:
        raise ValueError("codes_per_level is empty: a SID needs at least one level")
    bad_k = [(l, k) for l, k in enumerate(per_level) if k <= 0]
    if bad_k:
        raise ValueError(f"codes_per_level[{bad_k[0][0]}] = {bad_k[0][1]}: every level needs >= 1 code")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [n_items, L], got shape {tuple(codes.shape)}")
    if codes.shape[1] != len(per_level):
        raise ValueError(f"codes has {codes.shape[1]} levels per row (shape {tuple(codes.shape)}) but "
                         f"codes_per_level has {len(per_level)} levels: {per_level}")
    if codes.shape[0] == 0:
        raise ValueError("codes has no rows: an empty catalogue has no trie")
    codes = codes.long()
    limits = torch.tensor(per_level, dtype=torch.long, device=codes.device)
    bad = (codes < 0) | (codes >= limits)
    if bool(bad.any()):
        rows = bad.any(dim=1).nonzero().flatten()
        row = int(rows[0])
        level = int(bad[row].nonzero()[0])
        raise ValueError(
            f"item row {row}, level {level}: code {int(codes[row, level])} is outside "
            f"[0, {per_level[level]}) ({rows.numel()} row(s) out of range in total)")
    return codes, per_level


def _lexicographic_order(codes: torch.Tensor, per_level: tuple[int, ...]) -> torch.Tensor:
    """Row permutation sorting the SIDs lexicographically; equal SIDs keep their row order."""
    n, L = codes.shape
    if math.prod(per_level) <= 2 ** 63:
        # Mixed-radix key fits in int64: one stable sort.
        key = torch.zeros(n, dtype=torch.long, device=codes.device)
        for l in range(L):
            key = key * per_level[l] + codes[:, l]
        return torch.sort(key, stable=True).indices
    # Too wide for one key: stable sorts from the last level to the first (LSD).
    perm = torch.arange(n, device=codes.device)
    for l in reversed(range(L)):
        perm = perm[torch.sort(codes[perm, l], stable=True).indices]
    return perm


def _build_torch(codes: torch.Tensor, per_level: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Vectorised reference builder: the core tensors of :data:`_CORE` on ``codes.device``."""
    n, L = codes.shape
    dev = codes.device
    perm = _lexicographic_order(codes, per_level)
    s = codes[perm]
    # opens[i, l]: sorted row i starts a new prefix of length l + 1 (it differs from row i - 1 somewhere in
    # its first l + 1 codes).
    opens = torch.ones(n, L, dtype=torch.bool, device=dev)
    if n > 1:
        opens[1:] = torch.cumsum((s[1:] != s[:-1]).to(torch.int32), dim=1) > 0
    counts = opens.sum(dim=0).tolist()
    offsets = [0, 1]
    for c in counts:
        offsets.append(offsets[-1] + int(c))
    n_nodes = offsets[-1]
    parent = torch.empty(n_nodes, dtype=torch.long, device=dev)
    node_code = torch.empty(n_nodes, dtype=torch.long, device=dev)
    parent[0] = -1
    node_code[0] = -1
    row_node = torch.zeros(n, dtype=torch.long, device=dev)  # node of each sorted row at the previous level
    for l in range(L):
        starts = opens[:, l].nonzero().flatten()
        lo, hi = offsets[l + 1], offsets[l + 2]
        parent[lo:hi] = row_node[starts]
        node_code[lo:hi] = s[starts, l]
        row_node = torch.cumsum(opens[:, l], dim=0) - 1 + lo
    children = torch.bincount(parent[1:], minlength=n_nodes)
    indptr = torch.zeros(n_nodes + 1, dtype=torch.long, device=dev)
    indptr[1:] = torch.cumsum(children, dim=0)
    leaf_ptr = torch.cat([opens[:, L - 1].nonzero().flatten(), torch.tensor([n], device=dev)])
    item_leaf = torch.empty(n, dtype=torch.long, device=dev)
    item_leaf[perm] = row_node
    return {
        "level_offsets": torch.tensor(offsets, dtype=torch.long, device=dev),
        "parent": parent, "node_code": node_code, "indptr": indptr,
        "leaf_ptr": leaf_ptr.long(), "leaf_items": perm.long(), "item_leaf": item_leaf,
    }


def _build_cpp(codes: torch.Tensor, per_level: tuple[int, ...]) -> dict[str, torch.Tensor]:
    op = backends.extension_op("trie_build")
    if op is None:
        raise RuntimeError("the C++ trie builder is not available: the extension gflowgr_core._C is not "
                           "built or lacks the op trie_build (rebuild with `pip install --no-build-isolation "
                           "-e .`), or use backend='torch'")
    out = op(codes.detach().cpu().contiguous(), list(per_level))
    return {name: t.to(codes.device) for name, t in zip(_CORE, out)}


class Trie:
    """Level-ordered prefix trie over SIDs with CSR edges, optional dense tables and leaf → item lists.

    Build with :meth:`Trie.build`; load with :meth:`Trie.load` / :meth:`Trie.from_state_dict`.

    Tensors (int64, all on :attr:`device`):
        ``level_offsets[L + 2]``: nodes of level ``l`` are ``[level_offsets[l], level_offsets[l + 1])``.
        ``parent[n_nodes]`` (``-1`` for the root), ``node_code[n_nodes]`` (code of the edge into the node,
        ``-1`` for the root).
        ``indptr[n_nodes + 1]``, ``child_code[n_edges]``, ``child_node[n_edges]``: CSR children, sorted by
        code within a node; ``child_node[e] == e + 1``.
        ``leaf_ptr[n_leaves + 1]``, ``leaf_items[n_items]``: items of leaf ``j`` (node
        ``level_offsets[L] + j``) are ``leaf_items[leaf_ptr[j]:leaf_ptr[j + 1]]``, ascending.
        ``item_leaf[n_items]``: leaf node of each item.
        ``dense[l]`` for ``l < len(dense)``: ``[nodes_at_level_l, K_l]`` child node (``-1`` = no child).
        ``edge_key[n_edges]``: ``parent * max_codes + code`` of each edge, ascending (the sparse lookup key).

    Python ints: ``num_levels`` (L), ``codes_per_level``, ``max_codes`` (max K_l), ``max_branch[l]`` (most
    children of a level-``l`` node, ``l < L``), ``num_nodes``, ``num_edges``, ``num_leaves``, ``num_items``,
    ``max_items_per_leaf``, ``nodes_per_level``; ``builder`` names the builder that made the tables.
    """

    def __init__(self, core: dict[str, torch.Tensor], codes_per_level: Sequence[int], *,
                 dense_levels: int = 2, dense_max_entries: int = DEFAULT_DENSE_MAX_ENTRIES,
                 builder: str = "torch", dense: Optional[list[torch.Tensor]] = None):
        """Assemble a trie from builder output (``core`` holds the tensors named in ``_CORE``).

        Users call :meth:`build` or :meth:`load`; this derives the edge arrays, level statistics and the
        dense tables (or takes ``dense`` as given, when moving an existing trie).
        """
        missing = [k for k in _CORE if k not in core]
        if missing:
            raise ValueError(f"trie tables missing: {missing}")
        self.codes_per_level = tuple(int(k) for k in codes_per_level)
        self.num_levels = len(self.codes_per_level)
        self.max_codes = max(self.codes_per_level)
        self.dense_levels = int(dense_levels)
        self.dense_max_entries = int(dense_max_entries)
        self.builder = builder
        for name in _CORE:
            setattr(self, name, core[name])
        L = self.num_levels
        offsets = [int(x) for x in self.level_offsets.tolist()]
        if len(offsets) != L + 2 or offsets[0] != 0 or offsets[1] != 1:
            raise ValueError(f"level_offsets must be [0, 1, ...] of length L + 2 = {L + 2}, got {offsets}")
        self._offsets = offsets
        self.num_nodes = offsets[-1]
        self.num_edges = self.num_nodes - 1
        self.num_leaves = offsets[L + 1] - offsets[L]
        self.num_items = int(self.leaf_items.numel())
        self.nodes_per_level = tuple(offsets[l + 1] - offsets[l] for l in range(L + 1))
        expected = {"parent": self.num_nodes, "node_code": self.num_nodes, "indptr": self.num_nodes + 1,
                    "leaf_ptr": self.num_leaves + 1, "leaf_items": self.num_items,
                    "item_leaf": self.num_items}
        for name, size in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != (size,):
                raise ValueError(f"trie table {name} has shape {got}, expected ({size},)")

        self.child_code = self.node_code[1:].clone()
        self.child_node = torch.arange(1, self.num_nodes, dtype=torch.long, device=self.device)
        self.edge_key = self.parent[1:] * self.max_codes + self.child_code
        branching = self.indptr[1:] - self.indptr[:-1]
        self.max_branch = tuple(int(branching[offsets[l]:offsets[l + 1]].max()) for l in range(L))
        self.max_items_per_leaf = int((self.leaf_ptr[1:] - self.leaf_ptr[:-1]).max())
        self.dense = dense if dense is not None else self._dense_tables()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, codes: torch.Tensor, codes_per_level: Sequence[int], dense_levels: int = 2,
              backend: str = "auto", dense_max_entries: int = DEFAULT_DENSE_MAX_ENTRIES) -> "Trie":
        """Build the trie of the SIDs ``codes`` (``LongTensor[n_items, L]``, row ``i`` = item ``i``).

        Args:
            codes: integer tensor ``[n_items, L]``, codes of level ``l`` in ``[0, codes_per_level[l])``.
                Duplicate rows (colliding SIDs) share a leaf. The trie lives on ``codes.device``.
            codes_per_level: ``K_l`` per level.
            dense_levels: build dense ``[nodes_at_level_l, K_l]`` child tables for levels ``l <
                dense_levels``, stopping at the first level whose table would exceed
                ``dense_max_entries`` entries.
            backend: ``"auto"`` (C++ when the extension provides it, else PyTorch), ``"cpp"`` or
                ``"torch"``. The one used is recorded in :attr:`builder`.

        Raises:
            ValueError: wrong shape or number of levels, no rows, non-positive ``K_l``, or a code out of
                range (the message names the item row and level).
        """
        codes, per_level = _validate_codes(codes, codes_per_level)
        if backend == "auto":
            backend = "cpp" if backends.extension_op("trie_build") is not None else "torch"
        if backend == "cpp":
            core = _build_cpp(codes, per_level)
        elif backend == "torch":
            core = _build_torch(codes, per_level)
        else:
            raise ValueError(f"unknown trie builder backend {backend!r}; expected 'auto', 'cpp' or 'torch'")
        return cls(core, per_level, dense_levels=dense_levels, dense_max_entries=dense_max_entries,
                   builder=backend)

    def _dense_tables(self) -> list[torch.Tensor]:
        tables = []
        off = self._offsets
        for l in range(min(self.dense_levels, self.num_levels)):
            rows, width = off[l + 1] - off[l], self.codes_per_level[l]
            if rows * width > self.dense_max_entries:
                break
            table = torch.full((rows, width), -1, dtype=torch.long, device=self.device)
            kids = torch.arange(off[l + 1], off[l + 2], device=self.device)
            table[self.parent[kids] - off[l], self.node_code[kids]] = kids
            tables.append(table)
        return tables

    # ------------------------------------------------------------------ queries
    @property
    def device(self) -> torch.device:
        return self.parent.device

    @property
    def num_dense(self) -> int:
        """Number of leading levels with a dense child table."""
        return len(self.dense)

    def _check_level(self, level: int, what: str) -> int:
        level = int(level)
        if not 0 <= level < self.num_levels:
            raise ValueError(f"{what}: level must be in [0, {self.num_levels}), got {level}")
        return level

    def node_level(self, nodes: torch.Tensor) -> torch.Tensor:
        """Level of each node (``LongTensor`` shaped like ``nodes``; ``-1`` for ``-1``/out-of-range ids)."""
        nodes = nodes.long()
        lvl = torch.searchsorted(self.level_offsets, nodes, right=True) - 1
        return torch.where((nodes >= 0) & (nodes < self.num_nodes), lvl, torch.full_like(lvl, -1))

    def next_node(self, nodes: torch.Tensor, codes: torch.Tensor, level: Optional[int] = None) -> torch.Tensor:
        """Child of ``nodes`` along ``codes`` (same shape ``[...]``), ``-1`` where there is no such edge.

        ``-1`` also where the node is ``-1`` or out of range, or the code is out of range. With ``level``
        given, nodes not of that level give ``-1`` too, and a dense level uses its table; otherwise (or
        for a sparse level) the child is found by binary search of ``node * max_codes + code`` in
        :attr:`edge_key`. Both paths give identical results.
        """
        nodes = nodes.long()
        codes = codes.long()
        if level is None:
            lo, hi, width = 0, self.num_nodes, self.max_codes
        else:
            level = self._check_level(level, "next_node")
            lo, hi, width = self._offsets[level], self._offsets[level + 1], self.codes_per_level[level]
        ok = (nodes >= lo) & (nodes < hi) & (codes >= 0) & (codes < width)
        if level is not None and level < self.num_dense:
            got = self.dense[level][(nodes - lo).clamp(0, hi - lo - 1), codes.clamp(0, width - 1)]
            return torch.where(ok, got, torch.full_like(got, -1))
        key = torch.where(ok, nodes * self.max_codes + codes, torch.full_like(nodes, -1))
        pos = torch.searchsorted(self.edge_key, key).clamp_(max=self.num_edges - 1)
        hit = ok & (self.edge_key[pos] == key)
        return torch.where(hit, self.child_node[pos], torch.full_like(pos, -1))

    def children(self, nodes: torch.Tensor, level: Optional[int] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Children of ``nodes[R]`` as ``(codes[R, B], nodes[R, B], valid[R, B])``, sorted by code.

        ``B = max_branch[level]`` when ``level`` is given (all nodes must be of that level; other rows get
        no children), else ``max(max_branch)``. Padding entries are ``-1`` with ``valid`` False; rows of
        ``-1``/out-of-range nodes and leaves have no valid entries.
        """
        nodes = nodes.long()
        if level is None:
            width = max(self.max_branch)
            ok = (nodes >= 0) & (nodes < self.num_nodes)
        else:
            level = self._check_level(level, "children")
            width = self.max_branch[level]
            ok = (nodes >= self._offsets[level]) & (nodes < self._offsets[level + 1])
        safe = torch.where(ok, nodes, torch.zeros_like(nodes))
        start = self.indptr[safe]
        end = torch.where(ok, self.indptr[safe + 1], start)
        edge = start.unsqueeze(-1) + torch.arange(width, device=nodes.device)
        valid = edge < end.unsqueeze(-1)
        edge = edge.clamp_(max=self.num_edges - 1)
        minus = torch.full_like(edge, -1)
        return (torch.where(valid, self.child_code[edge], minus),
                torch.where(valid, self.child_node[edge], minus), valid)

    def child_mask(self, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """``Bool[R, K_level]``: which codes of ``level`` are edges out of ``nodes[R]`` (level-``level``
        nodes; rows of other nodes, including ``-1``, are all False)."""
        level = self._check_level(level, "child_mask")
        nodes = nodes.long()
        width = self.codes_per_level[level]
        if level < self.num_dense:
            lo, hi = self._offsets[level], self._offsets[level + 1]
            ok = (nodes >= lo) & (nodes < hi)
            rows = self.dense[level][(nodes - lo).clamp(0, hi - lo - 1)]
            return (rows >= 0) & ok.unsqueeze(-1)
        codes, _, valid = self.children(nodes, level)
        # Invalid slots write into a spare last column that is dropped.
        cols = torch.where(valid, codes, torch.full_like(codes, width))
        mask = torch.zeros(*nodes.shape, width + 1, dtype=torch.bool, device=nodes.device)
        mask.scatter_(-1, cols, True)
        return mask[..., :width]

    def leaf_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Leaf node of each SID ``codes[..., L]`` (shape ``[...]``), ``-1`` where the SID is not in the
        trie or a code is out of range."""
        if codes.dim() == 0 or codes.shape[-1] != self.num_levels:
            raise ValueError(f"codes must be [..., L={self.num_levels}], got shape {tuple(codes.shape)}")
        node = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for l in range(self.num_levels):
            node = self.next_node(node, codes[..., l], level=l)
        return node

    def contains(self, codes: torch.Tensor) -> torch.Tensor:
        """``Bool[...]``: whether each SID ``codes[..., L]`` is a catalogue SID."""
        return self.leaf_of(codes) >= 0

    def leaf_sid(self, leaf_nodes: torch.Tensor) -> torch.Tensor:
        """SID codes ``[..., L]`` of leaf nodes ``[...]``; rows of non-leaf or ``-1`` nodes are all ``-1``."""
        leaf_nodes = leaf_nodes.long()
        L = self.num_levels
        ok = (leaf_nodes >= self._offsets[L]) & (leaf_nodes < self.num_nodes)
        node = torch.where(ok, leaf_nodes, torch.zeros_like(leaf_nodes))
        out = torch.empty(*leaf_nodes.shape, L, dtype=torch.long, device=leaf_nodes.device)
        for l in reversed(range(L)):
            out[..., l] = self.node_code[node]
            node = self.parent[node].clamp(min=0)
        return torch.where(ok.unsqueeze(-1), out, torch.full_like(out, -1))

    def items_of_leaves(self, leaf_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items of leaf nodes ``[...]`` as ``(items[..., M], valid[..., M])``, ``M = max_items_per_leaf``.

        Items are ascending within a leaf; padding is ``-1``; non-leaf and ``-1`` nodes have no items.
        """
        leaf_nodes = leaf_nodes.long()
        L = self.num_levels
        ok = (leaf_nodes >= self._offsets[L]) & (leaf_nodes < self.num_nodes)
        j = torch.where(ok, leaf_nodes - self._offsets[L], torch.zeros_like(leaf_nodes))
        start = self.leaf_ptr[j]
        end = torch.where(ok, self.leaf_ptr[j + 1], start)
        slot = start.unsqueeze(-1) + torch.arange(self.max_items_per_leaf, device=leaf_nodes.device)
        valid = slot < end.unsqueeze(-1)
        items = self.leaf_items[slot.clamp_(max=self.num_items - 1)]
        return torch.where(valid, items, torch.full_like(items, -1)), valid

    def stats(self) -> dict:
        """Sizes: nodes per level, edges, leaves, items, collisions, max_branch, dense levels and bytes."""
        tensors = [getattr(self, n) for n in _CORE] + [self.child_code, self.child_node, self.edge_key]
        return {
            "num_levels": self.num_levels,
            "codes_per_level": list(self.codes_per_level),
            "nodes_per_level": list(self.nodes_per_level),
            "num_nodes": self.num_nodes,
            "num_edges": self.num_edges,
            "num_leaves": self.num_leaves,
            "num_items": self.num_items,
            "items_sharing_a_leaf": self.num_items - self.num_leaves,
            "max_items_per_leaf": self.max_items_per_leaf,
            "max_branch": list(self.max_branch),
            "dense_levels": self.num_dense,
            "csr_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "dense_bytes": sum(t.numel() * t.element_size() for t in self.dense),
            "builder": self.builder,
        }

    # ------------------------------------------------------------------ movement and persistence
    def to(self, device: Union[str, torch.device]) -> "Trie":
        """A copy of the trie with every table on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        core = {name: getattr(self, name).to(device) for name in _CORE}
        return Trie(core, self.codes_per_level, dense_levels=self.dense_levels,
                    dense_max_entries=self.dense_max_entries, builder=self.builder,
                    dense=[t.to(device) for t in self.dense])

    def state_dict(self) -> dict:
        """The builder tensors and settings; derived tables are rebuilt by :meth:`from_state_dict`."""
        state = {"format": STATE_FORMAT, "codes_per_level": list(self.codes_per_level),
                 "dense_levels": self.dense_levels, "dense_max_entries": self.dense_max_entries,
                 "builder": self.builder}
        state.update({name: getattr(self, name) for name in _CORE})
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device: Union[str, torch.device, None] = None) -> "Trie":
        """Rebuild a trie from :meth:`state_dict` output, optionally on ``device``."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a trie state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        core = {}
        for name in _CORE:
            t = state.get(name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"trie state lacks tensor {name!r}")
            core[name] = t.long() if device is None else t.long().to(device)
        return cls(core, state["codes_per_level"], dense_levels=state["dense_levels"],
                   dense_max_entries=state["dense_max_entries"], builder=state["builder"])

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the trie to ``directory/trie.pt`` (created if needed); returns the file path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        path = path / FILE_NAME
        state = self.state_dict()
        state.update({name: getattr(self, name).cpu() for name in _CORE})
        torch.save(state, path)
        return path

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> "Trie":
        """Load a trie written by :meth:`save` from ``directory/trie.pt``."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no trie file at {path} (write one with Trie.save)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report which file is unreadable
            raise ValueError(f"{path}: unreadable trie file ({exc})") from exc
        try:
            return cls.from_state_dict(state, device=device)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def __repr__(self) -> str:
        return (f"Trie(levels={self.num_levels}, codes_per_level={self.codes_per_level}, "
                f"nodes_per_level={self.nodes_per_level}, items={self.num_items}, "
                f"max_branch={self.max_branch}, dense_levels={self.num_dense}, device={self.device})")
