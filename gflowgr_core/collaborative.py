"""The collaborative model (CM): SASRec, and the score cache the reward and curriculum sampler read.

SASRec (Kang & McAuley, 2018) encodes a left-padded item history with item embeddings plus learned
absolute positions and a stack of causal pre-norm transformer blocks; the hidden state at the last
position is the user representation ``u``, and the score of item ``i`` is ``u . E[i]`` with ``E`` the same
item embedding table that reads the input (weight tying).

Training (:func:`train_sasrec`) reads the leave-one-out split of ``gflowgr_core.data.split`` as whole
sequences (:func:`whole_sequence_rows`): one row per user holds the training part of the user's sequence,
and every position predicts the next item, so one causal pass scores all of that user's training targets
(full-softmax cross-entropy over the catalogue, averaged over targets). Each target sees exactly the
items its per-prefix training row holds; a target whose history was truncated to ``max_history`` gets a
row of its own. Validation NDCG@10 (full-catalogue ranking, nothing excluded unless ``exclude_history``)
drives early stopping; the best epoch's weights are kept.

:func:`load_or_train_sasrec` trains once per (configuration, split) and caches the model outside the
data folder (:func:`default_cache_dir`).

:class:`CMScorer` caches, for one split, the user representation of every row and the item embeddings, so
the score of any (row, item) pair is a gather and a dot product; it also keeps each row's score mean and
standard deviation over the catalogue for the ``sigmoid_z`` normalisation.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gflowgr_core import metrics
from gflowgr_core.devices import resolve_device

__all__ = ["SASRecConfig", "SASRec", "SequenceRows", "whole_sequence_rows", "train_sasrec", "rank_items",
           "evaluate_sasrec", "load_or_train_sasrec", "sasrec_cache_name", "default_cache_dir", "CMScorer",
           "split_fingerprint"]

log = logging.getLogger("gflowgr")

PAD = -1
# Row chunks for [rows, n_items] score matrices are sized to hold about this many floats (64 MiB fp32).
_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------------------ config


@dataclass
class SASRecConfig:
    """Hyper-parameters of SASRec and of its training.

    Attributes:
        dim: embedding / hidden width ``d``.
        num_blocks: transformer blocks.
        num_heads: attention heads (``dim`` must be divisible by it).
        ffn_dim: width of the feed-forward layer; ``None`` means ``dim`` (as in the SASRec paper).
        dropout: dropout on embeddings, attention weights and block outputs.
        lr, weight_decay: AdamW settings.
        batch_size: training rows per step; a row is one user's whole training sequence (or a window of it,
            see :func:`whole_sequence_rows`), so a step scores several targets per row (on Beauty 3.6 on
            average: 64 rows are about 230 targets, as many updates per epoch as 256 single-target rows).
        max_epochs: upper bound on epochs over the training rows.
        patience: stop after this many evaluations without a better validation ``early_stop_metric``.
        early_stop_metric: key of :func:`gflowgr_core.metrics.evaluate_rankings` to maximise.
        eval_ks: cut-offs reported on validation and test (must contain the early-stop cut-off).
        eval_batch_size: rows per scoring batch at evaluation.
        exclude_history: drop the history's items from the ranking at evaluation (off: generative
            recommenders are evaluated without exclusion, and this model is their sanity baseline).
        grad_clip: max global gradient norm, ``None`` for no clipping.
        seed: seeds initialisation, shuffling and dropout (the caller's global RNG state is restored).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"`` (CUDA when available).
        progress: show tqdm bars while stderr is a terminal (none in batch jobs, where the epoch lines report).
        verbose: also print the per-epoch lines and the final valid/test metrics on the console when logging
            does not show the ``gflowgr`` logger's INFO lines (no logging configured, as in a notebook). They
            are logged at INFO whatever this says (``gflowgr`` commands show them).
        log_path: append one JSON line per epoch to this file.
    """

    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: Optional[int] = None
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 100
    patience: int = 5
    early_stop_metric: str = "ndcg@10"
    eval_ks: tuple[int, ...] = (5, 10, 20)
    eval_batch_size: int = 1024
    exclude_history: bool = False
    grad_clip: Optional[float] = 5.0
    seed: int = 42
    device: str = "cpu"
    progress: bool = True
    verbose: bool = True
    log_path: Optional[str] = None

    def __post_init__(self) -> None:
        self.eval_ks = tuple(int(k) for k in self.eval_ks)
        positive = ("dim", "num_blocks", "num_heads", "batch_size", "max_epochs", "patience", "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SASRecConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"SASRecConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"SASRecConfig.lr must be positive, got {self.lr}")
        cut = self.early_stop_metric.split("@")
        if len(cut) != 2 or not cut[1].isdigit() or int(cut[1]) not in self.eval_ks:
            raise ValueError(f"SASRecConfig.early_stop_metric={self.early_stop_metric!r} must be '<metric>@K' "
                             f"with K in eval_ks={self.eval_ks}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SASRecConfig":
        """Build from a plain dict (e.g. a YAML section); unknown keys raise, naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SASRecConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- model


class _Block(nn.Module):
    """Pre-norm causal self-attention + position-wise feed-forward, both residual."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, last_only: bool = False) -> Tensor:
        """``x[B, H, d]``, ``allowed[B, 1, H, H]`` (True where query i may read key j) -> ``[B, H, d]``.

        With ``last_only`` only the last position is computed (``[B, 1, d]``): it reads every key, but
        nothing after it needs the other positions, which saves most of the last block's work.
        """
        b, h, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, h, 3, self.num_heads, d // self.num_heads).unbind(2)
        if last_only:
            x, q, allowed = x[:, -1:], q[:, -1:], allowed[:, :, -1:]
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, x.shape[1], d)))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender over a catalogue of ``num_items`` items.

    Args:
        num_items: catalogue size; items are ``0..num_items-1``, ``-1`` pads histories.
        max_history: ``H``, the history width the positions are learned for.
        dim, num_blocks, num_heads, ffn_dim, dropout: see :class:`SASRecConfig`.
    """

    def __init__(self, num_items: int, max_history: int, dim: int = 64, num_blocks: int = 2, num_heads: int = 1,
                 ffn_dim: Optional[int] = None, dropout: float = 0.3) -> None:
        super().__init__()
        if num_items <= 0 or max_history <= 0:
            raise ValueError(f"num_items and max_history must be positive, got {num_items}, {max_history}")
        self.num_items = int(num_items)
        self.max_history = int(max_history)
        self.hparams = {"num_items": self.num_items, "max_history": self.max_history, "dim": dim,
                        "num_blocks": num_blocks, "num_heads": num_heads, "ffn_dim": ffn_dim, "dropout": dropout}
        # Row num_items is the padding embedding (kept at zero) so -1 maps to a real row.
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        self.pos_emb = nn.Embedding(max_history, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, ffn_dim or dim, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        dim = self.item_emb.embedding_dim
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[self.num_items].zero_()

    @property
    def dim(self) -> int:
        return self.item_emb.embedding_dim

    def _fit_history(self, history: Tensor) -> Tensor:
        if history.dim() != 2:
            raise ValueError(f"history must be [B, H], got shape {tuple(history.shape)}")
        width = history.shape[1]
        if width > self.max_history:
            raise ValueError(f"history has {width} columns but the model was built for max_history="
                             f"{self.max_history}")
        if width < self.max_history:
            history = F.pad(history, (self.max_history - width, 0), value=PAD)
        return history

    def encode(self, history: Tensor, last_only: bool = False) -> Tensor:
        """Hidden states ``[B, H, d]`` of a left-padded history ``LongTensor[B, H]`` (``-1`` = pad).

        With ``last_only`` the result is ``[B, 1, d]``, the last position only (same values, less work).
        """
        history = self._fit_history(history)
        valid = history >= 0
        tokens = torch.where(valid, history, torch.full_like(history, self.num_items))
        x = self.item_emb(tokens) * math.sqrt(self.dim) + self.pos_emb.weight
        x = self.emb_drop(x) * valid[..., None]
        h = history.shape[1]
        causal = torch.ones(h, h, dtype=torch.bool, device=history.device).tril()
        # Pad positions may read only themselves: a row with no visible key would give NaN attention,
        # and real positions never read pads.
        allowed = (causal & valid[:, None, :]) | torch.eye(h, dtype=torch.bool, device=history.device)
        allowed = allowed[:, None]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            cut = last_only and i == last
            x = block(x, allowed, last_only=cut) * (valid[:, -1:, None] if cut else valid[..., None])
        if last_only and not self.blocks:
            x = x[:, -1:]
        return self.final_norm(x)

    def user_representation(self, history: Tensor) -> Tensor:
        """``[B, d]``: the hidden state at the last (most recent) position."""
        return self.encode(history, last_only=True)[:, -1]

    def item_embeddings(self) -> Tensor:
        """``[num_items, d]``: the output layer (shared with the input item embeddings, pad row excluded)."""
        return self.item_emb.weight[: self.num_items]

    def forward(self, history: Tensor) -> Tensor:
        """Scores ``[B, num_items]`` of every catalogue item for each history ``[B, H]``."""
        return self.user_representation(history) @ self.item_embeddings().T

    def save(self, path: str | Path) -> Path:
        """``torch.save`` of the constructor arguments, the weights and ``train_report`` (if any).

        The file is written under a temporary name and renamed, so a reader never sees half a file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"hparams": self.hparams, "state_dict": self.state_dict(),
                    "train_report": getattr(self, "train_report", None)}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "SASRec":
        """Inverse of :meth:`save` (in eval mode; ``train_report`` restored when the file has one)."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or "hparams" not in blob or "state_dict" not in blob:
            raise ValueError(f"{path} is not a SASRec checkpoint written by SASRec.save")
        model = cls(**blob["hparams"])
        model.load_state_dict(blob["state_dict"])
        if blob.get("train_report") is not None:
            model.train_report = blob["train_report"]
        return model.to(map_location).eval()


# ------------------------------------------------------------------------------------- ranking / metrics


def _row_chunk(n_items: int, batch_size: Optional[int] = None) -> int:
    rows = max(1, _CHUNK_ELEMENTS // max(n_items, 1))
    return rows if batch_size is None else max(1, min(rows, batch_size))


@torch.no_grad()
def rank_items(model: SASRec, history: Tensor, k: int, batch_size: int = 1024,
               exclude_history: bool = False) -> Tensor:
    """Top-``k`` items ``LongTensor[N, k]`` (best first) of the model for each history ``[N, H]``.

    Runs in eval mode (restoring the model's mode) on the model's device; returns on the CPU.
    """
    if not 0 < k <= model.num_items:
        raise ValueError(f"k must be in 1..{model.num_items} (the catalogue size), got {k}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, history.shape[0], batch_size):
            hist = history[start:start + batch_size].to(device)
            scores = model(hist)
            if exclude_history:
                # An extra column absorbs the pads so they do not mask item 0.
                scores = F.pad(scores, (0, 1))
                cols = torch.where(hist >= 0, hist, torch.full_like(hist, model.num_items))
                scores.scatter_(1, cols, float("-inf"))
                scores = scores[:, :-1]
            out.append(scores.topk(k, dim=1).indices.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def evaluate_sasrec(model: SASRec, split, popularity: Tensor, ks: Sequence[int] = (5, 10, 20),
                    batch_size: int = 1024, exclude_history: bool = False) -> dict[str, float]:
    """Full-catalogue ranking metrics of ``model`` on a :class:`~gflowgr_core.data.split.Split`.

    Args:
        split: rows with ``history[N, H]`` and ``target[N]``.
        popularity: ``Tensor[num_items]`` training interaction counts (for the exposure metrics).
    Returns:
        The dict of :func:`gflowgr_core.metrics.evaluate_rankings`.
    """
    ranked = rank_items(model, split.history, max(ks), batch_size, exclude_history)
    return metrics.evaluate_rankings(ranked, split.target.cpu(), popularity.cpu(), ks=tuple(ks))


# ---------------------------------------------------------------------------------------------- training


def _check_split(name: str, split, num_items: int, max_history: int) -> None:
    hist, target = split.history, split.target
    if hist.dim() != 2 or hist.shape[1] != max_history:
        raise ValueError(f"{name}.history must be [N, {max_history}], got shape {tuple(hist.shape)}")
    if hist.shape[0] != target.shape[0]:
        raise ValueError(f"{name}: {hist.shape[0]} histories but {target.shape[0]} targets")
    if hist.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    bad = (hist < PAD) | (hist >= num_items)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"{name} row {row}: history {hist[row].tolist()} holds an item outside "
                         f"[0, {num_items}) (or a pad other than -1)")
    empty = (hist < 0).all(1)
    if bool(empty.any()):
        raise ValueError(f"{name} row {int(empty.nonzero()[0])} has an empty history; every row needs at "
                         "least one item")
    bad_t = (target < 0) | (target >= num_items)
    if bool(bad_t.any()):
        row = int(bad_t.nonzero()[0])
        raise ValueError(f"{name} row {row}: target {int(target[row])} is outside [0, {num_items})")


@dataclass
class SequenceRows:
    """Training rows that score many targets in one causal pass.

    Attributes:
        history: ``LongTensor[W, H]`` left-padded item sequences (``-1`` = pad).
        labels: ``LongTensor[W, H]``: at a scored position ``p``, the item that follows ``history[w, :p+1]``;
            ``-1`` at positions that are not scored.
    """

    history: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.history.shape[0])


def whole_sequence_rows(split) -> SequenceRows:
    """The per-prefix rows of ``split`` regrouped into whole-sequence rows, each target scored once.

    Row ``i`` continues row ``i-1`` when both belong to one user and ``history[i]`` is ``history[i-1]``
    with ``target[i-1]`` appended and nothing dropped (one item longer). A maximal run of continuing rows
    ``r..e`` becomes one sequence row: its input is ``history[e]``, and the target of row ``i`` is the
    label at column ``H-1-(e-i)``, where the causal model sees exactly ``history[i]``'s items. A row whose
    history was truncated (``H`` items and one dropped) continues nothing, so it forms a row of its own
    and its target still sees only its ``H`` items. On ``leave_one_out`` training rows (grouped by user,
    chronological) this gives one row per user whose training part fits in ``H + 1`` items, plus one
    per truncated target; on any other row order or subset it is still exact, only less compact.

    What changes against per-prefix rows is where an item sits, not what is visible: in a shared row,
    an earlier target's history is not right-aligned, so its items carry other absolute positions (the
    usual SASRec training, which scores every position of a left-padded sequence).

    Args:
        split: a :class:`~gflowgr_core.data.split.Split` with ``history[N, H]``, ``target[N]``,
            ``user[N]``; every history holds at least one item.
    """
    hist, target, user = split.history.cpu(), split.target.cpu(), split.user.cpu()
    n, width = hist.shape
    length = (hist >= 0).sum(1)
    if bool((length == 0).any()):
        raise ValueError(f"split row {int((length == 0).nonzero()[0])} has an empty history; every row needs "
                         "at least one item")
    cont = torch.zeros(n, dtype=torch.bool)
    if n > 1:
        cont[1:] = ((user[1:] == user[:-1]) & (length[1:] == length[:-1] + 1) & (hist[1:, -1] == target[:-1])
                    & (hist[1:, :-1] == hist[:-1, 1:]).all(1))
    window = (~cont).cumsum(0) - 1
    is_end = torch.ones(n, dtype=torch.bool)
    is_end[:-1] = ~cont[1:]
    end_row = is_end.nonzero().squeeze(1)
    # A run r..e has e-r+1 = length[e] - length[r] + 1 <= H rows, so every column is inside the row.
    column = width - 1 - (end_row[window] - torch.arange(n))
    labels = torch.full((len(end_row), width), PAD, dtype=torch.long)
    labels[window, column] = target
    return SequenceRows(hist[end_row].contiguous(), labels)


def _sequence_loss(model: SASRec, history: Tensor, labels: Tensor) -> Tensor:
    """Mean full-catalogue cross-entropy over the scored positions of ``history[B, H]``."""
    scored = labels >= 0
    hidden = model.encode(history)[scored]
    return F.cross_entropy(hidden @ model.item_embeddings().T, labels[scored])


def _fork_devices(device: torch.device) -> list:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def train_sasrec(split_data, config: Optional[SASRecConfig] = None) -> SASRec:
    """Train SASRec on a leave-one-out split and report its own validation and test metrics.

    Args:
        split_data: ``SplitData`` from ``gflowgr_core.data.split.leave_one_out`` (``train``, ``valid``,
            ``test`` with ``history[N, H]`` / ``target[N]``; ``num_items``; ``max_history``). The
            training rows are regrouped by :func:`whole_sequence_rows`, so every training target is
            learned from exactly the items of its row.
        config: :class:`SASRecConfig` (defaults if ``None``).

    Returns:
        The model with the best validation ``early_stop_metric`` weights, in eval mode, on
        ``config.device``. ``model.train_report`` holds ``{"best_epoch", "epochs_run", "seconds",
        "valid": metrics, "test": metrics, "epochs": [per-epoch dicts], "config": ...}`` where the metric
        dicts are those of :func:`gflowgr_core.metrics.evaluate_rankings` (Recall/NDCG@K, exposure).

    Runs are repeatable for a seed on the CPU (bit for bit with the same thread count); on CUDA the
    embedding gradient's atomic adds can make the last bits differ between runs.
    """
    config = config or SASRecConfig()
    device = resolve_device(config.device)
    num_items, max_history = int(split_data.num_items), int(split_data.max_history)
    for name in ("train", "valid", "test"):
        _check_split(name, getattr(split_data, name), num_items, max_history)
    if max(config.eval_ks) > num_items:
        raise ValueError(f"eval_ks {config.eval_ks} exceed the catalogue size {num_items}")
    popularity = metrics.item_popularity(split_data)
    rows = whole_sequence_rows(split_data.train)

    started = time.perf_counter()
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(config.seed)
        model = SASRec(num_items, max_history, config.dim, config.num_blocks, config.num_heads,
                       config.ffn_dim, config.dropout).to(device)
        best_epoch, epochs = _fit(model, rows, split_data.valid, popularity, config, started)
    model.eval()
    valid = evaluate_sasrec(model, split_data.valid, popularity, config.eval_ks, config.eval_batch_size,
                            config.exclude_history)
    test = evaluate_sasrec(model, split_data.test, popularity, config.eval_ks, config.eval_batch_size,
                           config.exclude_history)
    model.train_report = {"best_epoch": best_epoch, "epochs_run": len(epochs),
                          "seconds": time.perf_counter() - started, "valid": valid, "test": test,
                          "epochs": epochs, "config": config.to_dict()}
    shown = [key for key in ("recall@10", "ndcg@10") if key in valid]
    _report(f"SASRec best epoch {best_epoch} of {len(epochs)}: " + "  ".join(
        f"valid {key} {valid[key]:.4f}  test {key} {test[key]:.4f}" for key in shown), config)
    return model


def _report(line: str, config: SASRecConfig) -> None:
    """Log ``line`` at INFO; with ``config.verbose`` print it instead when logging would not show it, so that it
    appears once either way."""
    if config.verbose and not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
        tqdm.write(line)
    else:
        log.info(line)


def _fit(model: SASRec, rows: SequenceRows, valid_split, popularity: Tensor, config: SASRecConfig,
         started: float) -> tuple[int, list[dict]]:
    """Train ``model`` epoch by epoch until validation ``early_stop_metric`` has not improved for
    ``patience`` epochs (or ``max_epochs``), then load its best weights.

    Returns the best epoch and one record per epoch (also appended to ``config.log_path`` as JSON lines).
    """
    device = next(model.parameters()).device
    history, labels = rows.history.to(device), rows.labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    shuffle = torch.Generator().manual_seed(config.seed)
    best_value, best_epoch, best_state, bad_evals = -math.inf, 0, None, 0
    epochs = []
    log_file = None
    if config.log_path:
        Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(config.log_path, "a")
    try:
        for epoch in range(1, config.max_epochs + 1):
            model.train()
            epoch_started = time.perf_counter()
            order = torch.randperm(len(rows), generator=shuffle).to(device)
            train_loss = _train_epoch(model, optimizer, history, labels, order, config, epoch)
            valid = evaluate_sasrec(model, valid_split, popularity, config.eval_ks, config.eval_batch_size,
                                    config.exclude_history)
            value = valid[config.early_stop_metric]
            improved = value > best_value
            if improved:
                best_value, best_epoch, bad_evals = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
            record = {"epoch": epoch, "train_loss": train_loss, "seconds": time.perf_counter() - started,
                      **{f"valid_{key}": val for key, val in valid.items() if key != "num_examples"}}
            epochs.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            # One line per epoch, on by default: a large catalogue's SASRec takes minutes before the main run.
            _report(f"SASRec epoch {epoch}/{config.max_epochs}: loss {train_loss:.4f}, valid "
                    f"{config.early_stop_metric} {value:.4f} (best {best_value:.4f} at epoch {best_epoch}), "
                    f"{time.perf_counter() - epoch_started:.1f}s", config)
            if bad_evals >= config.patience:
                break
    finally:
        if log_file is not None:
            log_file.close()
    model.load_state_dict(best_state)
    return best_epoch, epochs


def _train_epoch(model: SASRec, optimizer: torch.optim.Optimizer, history: Tensor, labels: Tensor,
                 order: Tensor, config: SASRecConfig, epoch: int) -> float:
    """One pass over the sequence rows in ``order`` in batches of ``config.batch_size``; the mean loss.

    Raises ``FloatingPointError`` when that loss is not finite (so a diverged run stops at once).
    """
    total, steps = torch.zeros((), device=history.device), 0
    # disable=None: no bar when stderr is not a terminal (a batch job's log would hold every redraw).
    bar = tqdm(range(0, len(order), config.batch_size), desc=f"SASRec epoch {epoch}",
               disable=None if config.progress else True, leave=False)
    for start in bar:
        idx = order[start:start + config.batch_size]
        loss = _sequence_loss(model, history[idx], labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += loss.detach()
        steps += 1
    train_loss = float(total) / steps
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"SASRec training loss became {train_loss} in epoch {epoch}; "
                                 f"lower lr (now {config.lr}) or enable grad_clip")
    return train_loss


# ------------------------------------------------------------------------------------------- model cache

CACHE_ENV = "GFLOWGR_CACHE"
# Settings that change how a run is shown or where it runs, not which model it trains.
_NOT_IN_CACHE_KEY = ("device", "progress", "verbose", "log_path")
# Bump when train_sasrec learns a different model from the same configuration and split.
_TRAINING_VERSION = 2


def default_cache_dir() -> Path:
    """Where :func:`load_or_train_sasrec` keeps models by default: ``$GFLOWGR_CACHE/cm`` when that variable
    is set, else ``$XDG_CACHE_HOME/gflowgr/cm`` (``~/.cache/gflowgr/cm``). Never inside a data folder, which
    may be read-only and is shared by runs with other settings."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "cm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gflowgr" / "cm"


def _split_data_fingerprint(split_data) -> str:
    digest = hashlib.sha1()
    digest.update(f"{int(split_data.num_items)}/{int(split_data.max_history)}".encode())
    for name in ("train", "valid", "test"):
        digest.update(split_fingerprint(getattr(split_data, name)).encode())
    return digest.hexdigest()[:16]


def sasrec_cache_name(split_data, config: SASRecConfig) -> str:
    """File name of the cached model: ``sasrec_<config hash>_<split hash>.pt``.

    The config hash covers every :class:`SASRecConfig` field except ``device``, ``progress``, ``verbose``
    and ``log_path``; the split hash covers the train, valid and test rows (valid drives early stopping)
    and the catalogue size.
    """
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_CACHE_KEY}
    blob = json.dumps({"training_version": _TRAINING_VERSION, "config": fields}, sort_keys=True)
    return f"sasrec_{hashlib.sha1(blob.encode()).hexdigest()[:12]}_{_split_data_fingerprint(split_data)}.pt"


def _metrics_line(report: dict) -> str:
    return "  ".join(f"{part} {key} {report[part][key]:.4f}" for part in ("valid", "test")
                     for key in ("recall@10", "ndcg@10") if key in report.get(part, {}))


def load_or_train_sasrec(split_data, config: Optional[SASRecConfig] = None, cache_dir: Optional[str | Path] = None,
                         *, is_main: bool = True, barrier=lambda: None) -> SASRec:
    """The SASRec of ``config`` on ``split_data``: loaded from ``cache_dir`` when cached, else trained and saved.

    Args:
        split_data: the ``SplitData`` to train on (see :func:`train_sasrec`).
        config: :class:`SASRecConfig` (defaults if ``None``); its ``device`` is where the model ends up.
        cache_dir: folder of cached models (default :func:`default_cache_dir`); the file is
            :func:`sasrec_cache_name`, so another configuration or split never reuses a model.
        is_main: in a multi-process run, ``True`` on the one process that trains and writes the file.
        barrier: called by every process after the main one has the file (e.g. the run's
            ``dist.barrier``); the other processes then load it.

    Returns:
        The model in eval mode on ``config.device``, with ``train_report`` (also when loaded).

    Raises:
        OSError: ``cache_dir`` cannot be created or written (checked before training), naming it.
    """
    config = config or SASRecConfig()
    device = resolve_device(config.device)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / sasrec_cache_name(split_data, config)
    model = None
    if is_main:
        if path.is_file():
            model = SASRec.load(path, map_location=device)
            log.info("collaborative model (SASRec) loaded from %s: %s", path,
                     _metrics_line(getattr(model, "train_report", {})))
        else:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(f"cannot create the SASRec cache folder {cache_dir} ({exc}); pass another "
                              f"cache_dir or set {CACHE_ENV}") from exc
            if not os.access(cache_dir, os.W_OK):
                raise OSError(f"the SASRec cache folder {cache_dir} is not writable; pass another cache_dir "
                              f"or set {CACHE_ENV}")
            log.info("collaborative model (SASRec): training on %d users' sequences, up to %d epoch(s) (early stopping "
                     "on validation %s, patience %d); it will be cached in %s", len(split_data.valid),
                     config.max_epochs, config.early_stop_metric, config.patience, path)
            model = train_sasrec(split_data, config)
            model.save(path)
            log.info("collaborative model (SASRec) trained, %s; saved to %s", _metrics_line(model.train_report), path)
    barrier()
    if model is None:
        model = SASRec.load(path, map_location=device)
    return model


# ------------------------------------------------------------------------------------------- score cache


def split_fingerprint(split) -> str:
    """Short hash of a split's histories and targets, to tie a score cache to the rows it was built for."""
    digest = hashlib.sha1()
    for tensor in (split.history, split.target):
        t = tensor.detach().to("cpu", torch.int64).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def _first_bad_row(x: Tensor) -> int:
    return int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero()[0])


class CMScorer:
    """Cached collaborative-model scores for the rows of one split.

    ``score(n, i) = user_repr[n] . item_emb[i]`` for split row ``n`` and item ``i``.

    Attributes:
        user_repr: ``FloatTensor[N, d]`` one user representation per split row.
        item_emb: ``FloatTensor[n_items, d]``.
        score_mean, score_std: ``FloatTensor[N]``, each row's score mean and (population) standard
            deviation over the whole catalogue.
        fingerprint: :func:`split_fingerprint` of the split the cache was built from (or ``None``).
    """

    def __init__(self, user_repr: Tensor, item_emb: Tensor, score_mean: Optional[Tensor] = None,
                 score_std: Optional[Tensor] = None, fingerprint: Optional[str] = None) -> None:
        if user_repr.dim() != 2 or item_emb.dim() != 2 or user_repr.shape[1] != item_emb.shape[1]:
            raise ValueError(f"user_repr [N, d] and item_emb [n_items, d] must agree on d, got "
                             f"{tuple(user_repr.shape)} and {tuple(item_emb.shape)}")
        if not bool(torch.isfinite(user_repr).all()):
            raise ValueError(f"CM user representation of row {_first_bad_row(user_repr)} is NaN/inf")
        if not bool(torch.isfinite(item_emb).all()):
            raise ValueError(f"CM item embedding of item {_first_bad_row(item_emb)} is NaN/inf")
        self.user_repr = user_repr.float()
        self.item_emb = item_emb.float()
        if score_mean is None or score_std is None:
            score_mean, score_std = self._catalogue_moments(self.user_repr, self.item_emb)
        self.score_mean = score_mean.to(self.user_repr.device, torch.float32)
        self.score_std = score_std.to(self.user_repr.device, torch.float32)
        self.fingerprint = fingerprint
        self._score_max: Optional[Tensor] = None  # per-row catalogue maximum, on first use (row_max)

    @staticmethod
    def _catalogue_moments(user_repr: Tensor, item_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Exact per-row mean/std of ``user_repr @ item_emb.T`` without the ``[N, n_items]`` matrix.

        The mean is ``u . mean(E)`` and the variance ``u^T Cov(E) u``; float64 with a centred covariance
        avoids the cancellation of ``E[s^2] - E[s]^2``.
        """
        e = item_emb.double()
        centre = e.mean(0)
        centred = e - centre
        cov = centred.T @ centred / e.shape[0]
        u = user_repr.double()
        mean = u @ centre
        var = ((u @ cov) * u).sum(1).clamp(min=0)
        return mean.float(), var.sqrt().float()

    @classmethod
    @torch.no_grad()
    def build(cls, model: SASRec, split, batch_size: int = 1024, device: Optional[str | torch.device] = None,
              progress: bool = False) -> "CMScorer":
        """Encode every row of ``split`` (``history[N, H]``) with ``model`` (eval mode, restored after).

        The cache lives on ``device`` (default: the model's device).
        """
        model_device = next(model.parameters()).device
        device = torch.device(device) if device is not None else model_device
        was_training = model.training
        model.eval()
        reprs = []
        try:
            for start in tqdm(range(0, split.history.shape[0], batch_size), desc="CM user representations",
                              disable=not progress, leave=False):
                reprs.append(model.user_representation(split.history[start:start + batch_size].to(model_device))
                             .to(device))
        finally:
            model.train(was_training)
        user_repr = torch.cat(reprs) if reprs else torch.zeros(0, model.dim, device=device)
        return cls(user_repr, model.item_embeddings().detach().to(device).clone(),
                   fingerprint=split_fingerprint(split))

    # ----------------------------------------------------------------------------------------- queries

    @property
    def num_examples(self) -> int:
        return int(self.user_repr.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_emb.shape[0])

    @property
    def device(self) -> torch.device:
        return self.user_repr.device

    def _rows(self, example_idx: Tensor) -> Tensor:
        example_idx = torch.as_tensor(example_idx, device=self.device)
        if example_idx.dim() != 1:
            raise ValueError(f"example_idx must be 1-D [B], got shape {tuple(example_idx.shape)}")
        return example_idx.long()

    def _check(self, example_idx: Tensor, items: Optional[Tensor], out: Tensor) -> None:
        """One host sync: index ranges and finiteness of ``out``, with a message naming the culprit."""
        flags = [((example_idx < 0) | (example_idx >= self.num_examples)).any(), ~torch.isfinite(out).all()]
        if items is not None:
            flags.append(((items < 0) | (items >= self.num_items)).any())
        bad_rows, non_finite, *bad_items = torch.stack(flags).tolist()
        if bad_rows:
            bad = example_idx[(example_idx < 0) | (example_idx >= self.num_examples)][0]
            raise IndexError(f"example index {int(bad)} outside the {self.num_examples} cached split rows")
        if bad_items and bad_items[0]:
            pos = ((items < 0) | (items >= self.num_items)).nonzero()[0].tolist()
            raise IndexError(f"item {int(items[tuple(pos)])} at {pos} outside the catalogue of "
                             f"{self.num_items} items")
        if non_finite:
            pos = (~torch.isfinite(out)).nonzero()[0].tolist()
            raise FloatingPointError(f"CM score is {float(out[tuple(pos)])} for example "
                                     f"{int(example_idx[pos[0]])} at {pos}")

    def score(self, example_idx: Tensor, items: Tensor) -> Tensor:
        """Raw CM scores ``FloatTensor[B, T]`` of ``items[B, T]`` for split rows ``example_idx[B]``."""
        rows = self._rows(example_idx)
        items = torch.as_tensor(items, device=self.device).long()
        if items.dim() != 2 or items.shape[0] != rows.shape[0]:
            raise ValueError(f"items must be [B, T] with B={rows.shape[0]}, got shape {tuple(items.shape)}")
        users = self.user_repr[rows.clamp(0, max(self.num_examples - 1, 0))]
        embs = self.item_emb[items.clamp(0, self.num_items - 1)]
        out = torch.einsum("bd,btd->bt", users, embs)
        self._check(rows, items, out)
        return out

    def full_scores(self, example_idx: Tensor) -> Tensor:
        """Scores of the whole catalogue ``FloatTensor[B, n_items]`` for split rows ``example_idx[B]``."""
        rows = self._rows(example_idx)
        out = self.user_repr[rows.clamp(0, max(self.num_examples - 1, 0))] @ self.item_emb.T
        self._check(rows, None, out)
        return out

    def topk_pool(self, example_idx: Tensor, m: int) -> Tensor:
        """The ``m`` highest-scoring items ``LongTensor[B, m]`` (best first) per row; nothing excluded."""
        if not 0 < m <= self.num_items:
            raise ValueError(f"m must be in 1..{self.num_items}, got {m}")
        rows = self._rows(example_idx)
        chunk = _row_chunk(self.num_items)
        parts = [self.full_scores(rows[s:s + chunk]).topk(m, dim=1).indices for s in range(0, rows.shape[0], chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, m, dtype=torch.long, device=self.device)

    def normalized(self, example_idx: Tensor, items: Tensor, method: str = "sigmoid_z",
                   temperature: float = 1.0) -> Tensor:
        """CM scores of ``items[B, T]`` for rows ``example_idx[B]`` mapped into ``[0, 1]``.

        - ``"sigmoid_z"``: ``sigmoid((s - mean_n) / std_n)`` with the row's score mean/std over the
          catalogue (a row whose scores are all equal gives 0.5).
        - ``"percentile"``: ``(#items scored lower + 0.5 * #other items tied) / (n_items - 1)``: the best
          item of the catalogue gets 1, the worst 0.
        - ``"softmax"``: ``exp((s - max_n) / temperature)``, the CM's softmax over the catalogue at that
          temperature divided by its largest entry (the row's best item gets 1). A per-row constant does not
          move the balance objectives' fixed point ``P_F(x | U) ∝ R(x)``, so with this as the whole reward
          the policy is trained towards the CM's own distribution (distillation of the teacher).
        """
        if method == "softmax":
            if not (temperature > 0 and math.isfinite(temperature)):
                raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
            rows = self._rows(example_idx)
            s = self.score(rows, items)
            return torch.exp((s - self.row_max(rows)[:, None]) / temperature).clamp(max=1.0)
        if method == "sigmoid_z":
            rows = self._rows(example_idx)
            s = self.score(rows, items)
            mean, std = self.score_mean[rows], self.score_std[rows]
            z = (s - mean[:, None]) / std.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
            return torch.where(std[:, None] > 0, torch.sigmoid(z), torch.full_like(z, 0.5))
        if method == "percentile":
            return self._percentile(example_idx, items)
        raise ValueError(f"method must be 'sigmoid_z', 'percentile' or 'softmax', got {method!r}")

    def row_max(self, example_idx: Tensor) -> Tensor:
        """Each row's largest score over the catalogue, ``FloatTensor[B]`` (every row's, computed in chunks on
        first use and kept: one pass over the ``[N, n_items]`` scores without holding them)."""
        rows = self._rows(example_idx)
        if self._score_max is None:
            chunk = _row_chunk(self.num_items)
            self._score_max = torch.cat([self.full_scores(torch.arange(i, min(i + chunk, self.num_examples),
                                                                       device=self.device)).amax(1)
                                         for i in range(0, self.num_examples, chunk)]) \
                if self.num_examples else torch.zeros(0, device=self.device)
        return self._score_max[rows.clamp(0, max(self.num_examples - 1, 0))]

    def _percentile(self, example_idx: Tensor, items: Tensor) -> Tensor:
        rows = self._rows(example_idx)
        items = torch.as_tensor(items, device=self.device).long()
        if items.dim() != 2 or items.shape[0] != rows.shape[0]:
            raise ValueError(f"items must be [B, T] with B={rows.shape[0]}, got shape {tuple(items.shape)}")
        if self.num_items == 1:
            return torch.full(items.shape, 0.5, device=self.device)
        self._check(rows, items, torch.zeros((), device=self.device))
        chunk = _row_chunk(self.num_items)
        parts = []
        for s in range(0, rows.shape[0], chunk):
            full = self.full_scores(rows[s:s + chunk])
            # Gather from the same matrix that is sorted, so an item always finds its own score exactly.
            own = full.gather(1, items[s:s + chunk])
            ordered = full.sort(dim=1).values
            lower = torch.searchsorted(ordered, own, side="left")
            upto = torch.searchsorted(ordered, own, side="right")
            parts.append((lower + 0.5 * (upto - lower - 1)).float() / (self.num_items - 1))
        return torch.cat(parts) if parts else torch.zeros(items.shape, device=self.device)

    # ------------------------------------------------------------------------------------- persistence

    def to(self, device: str | torch.device) -> "CMScorer":
        """A copy on ``device``."""
        return CMScorer(self.user_repr.to(device), self.item_emb.to(device), self.score_mean.to(device),
                        self.score_std.to(device), self.fingerprint)

    def save(self, path: str | Path) -> Path:
        """``torch.save`` the cache (CPU tensors) to ``path``, e.g. ``run_dir / "cm_train.pt"``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"user_repr": self.user_repr.cpu(), "item_emb": self.item_emb.cpu(),
                    "score_mean": self.score_mean.cpu(), "score_std": self.score_std.cpu(),
                    "fingerprint": self.fingerprint}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu", split=None) -> "CMScorer":
        """Load a cache written by :meth:`save`; with ``split``, check it was built for those rows."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        needed = {"user_repr", "item_emb", "score_mean", "score_std", "fingerprint"}
        if not isinstance(blob, dict) or not needed <= set(blob):
            raise ValueError(f"{path} is not a CM score cache written by CMScorer.save")
        if split is not None:
            expected = split_fingerprint(split)
            if blob["fingerprint"] != expected:
                raise ValueError(f"{path} was built for a different split (fingerprint {blob['fingerprint']}, "
                                 f"this split's is {expected}); rebuild it with CMScorer.build")
        return cls(blob["user_repr"], blob["item_emb"], blob["score_mean"], blob["score_std"], blob["fingerprint"])
