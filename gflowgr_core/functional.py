"""Functional API over plain tensors: the GFlowGR pieces for use inside any training or decoding script.

Every function here delegates to the library's implementation (the objectives in
:mod:`gflowgr_core.objectives`, the fused kernels where they apply, :mod:`gflowgr_core.decoding` and
:mod:`gflowgr_core.hf_processor`); nothing is computed a second way. Shapes use:

* ``T`` trajectories (or ``B`` examples), ``L`` SID levels, ``d`` hidden width, ``K_l`` codes of level ``l``;
* ``log_pf[T, L]``: ``log P_F(c_{l+1} | s_l)`` of each step;
* ``log_z[T]``: ``log Z(U)``; ``log_f[T, L-1]``: ``log F(s_1..s_{L-1})``; ``log_r[T]``: ``log R(s_L)``;
* ``h[T, L, d]``: hidden states at the decision positions (the position *before* each SID token, i.e. the
  state whose next-token prediction is that token); ``w_sid[sum K_l, d]``: the LM-head rows of the SID
  tokens, level-major (see :func:`sid_head_rows`).

Typical use in a plain HF loop (decoder-only, SID tokens starting at column ``start``)::

    out = model(input_ids, attention_mask=mask, output_hidden_states=True)
    h = F.decision_hidden(out.hidden_states[-1], start, L)            # [B, L, d]
    w_sid, bias = F.sid_head_rows(model, token_map)                    # [sum K_l, d], [sum K_l] | None
    log_pf = F.constrained_log_pf(h, w_sid, codes, trie, bias=bias) # [B, L]
    loss = F.trajectory_balance(log_pf, log_z, log_r)
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from . import backends
from .decoding.step import OP as _STEP_OP, constrained_step
from .hf_processor import SIDTrieLogitsProcessor, sids_from_sequences
from .objectives import balance as _balance
from .objectives import preference as _preference
from .objectives.gfn_loss import GFNLossOutput, gfn_loss as _gfn_loss
from .objectives.logpf import code_offsets as _code_offsets, constrained_log_pf
from .sid.tokens import SIDTokenMap
from .sid.trie import Trie

__all__ = [
    "trajectory_balance", "detailed_balance", "subtrajectory_balance", "constrained_log_pf", "gfn_loss",
    "sft_cross_entropy", "dpo_loss", "sdpo_loss", "build_trie", "sid_head_rows", "decision_hidden",
    "constrained_beam_search", "BeamSearchOutput",
]

_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------------------ balance losses
def _reduce_balance(objective: _balance.BalanceObjective, log_pf, log_z, log_f, log_r, weights, reduction):
    if reduction == "mean":
        return objective.loss(log_pf, log_z, log_f, log_r, weights)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    res = objective.residuals(log_pf, log_z, log_f, log_r)
    if weights is not None:
        # weighted_mean validates the weights; its value is not needed here.
        _balance.weighted_mean(res.detach(), weights)
        res = weights.to(res.dtype) * res
    return res.sum() if reduction == "sum" else res


def trajectory_balance(log_pf: torch.Tensor, log_z: torch.Tensor, log_r: torch.Tensor,
                       weights: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Trajectory balance ``L_TB = (log Z + sum_l log_pf[:, l] - log R)^2`` per trajectory.

    Args:
        log_pf: ``[T, L]`` per-step forward log-probabilities (e.g. from :func:`constrained_log_pf`).
        log_z: ``[T]`` ``log Z(U)`` (repeat a user's value over its trajectories).
        log_r: ``[T]`` log-rewards.
        weights: optional ``[T]`` non-negative trajectory weights.
        reduction: ``"mean"`` (``sum w * L / T``, the library's convention), ``"sum"`` or ``"none"`` (``[T]``,
            weighted).
    """
    return _reduce_balance(_balance.TrajectoryBalance(), log_pf, log_z, None, log_r, weights, reduction)


def detailed_balance(log_pf: torch.Tensor, log_z: torch.Tensor, log_f: torch.Tensor, log_r: torch.Tensor,
                     weights: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Detailed balance ``L_DB = sum_l (log F(s_l) + log_pf[:, l] - log F(s_{l+1}))^2`` with ``F(s_0) = Z``
    and ``F(s_L) = R``.

    Args:
        log_pf: ``[T, L]``; log_z: ``[T]``; log_f: ``[T, L-1]`` ``log F(s_1..s_{L-1})``; log_r: ``[T]``.
        weights, reduction: as in :func:`trajectory_balance`.
    """
    return _reduce_balance(_balance.DetailedBalance(), log_pf, log_z, log_f, log_r, weights, reduction)


def subtrajectory_balance(log_pf: torch.Tensor, log_z: torch.Tensor, log_f: torch.Tensor, log_r: torch.Tensor,
                          subtb_lambda: float = 0.9, weights: Optional[torch.Tensor] = None,
                          reduction: str = "mean") -> torch.Tensor:
    """SubTB(lambda): the ``lambda^(j-i)``-weighted average over all sub-trajectories ``0 <= i < j <= L`` of
    ``(log F(s_i) + sum_{i<=l<j} log_pf[:, l] - log F(s_j))^2``.

    Args:
        log_pf: ``[T, L]``; log_z: ``[T]``; log_f: ``[T, L-1]``; log_r: ``[T]``.
        subtb_lambda: ``lambda > 0``.
        weights, reduction: as in :func:`trajectory_balance`.
    """
    return _reduce_balance(_balance.SubTrajectoryBalance(subtb_lambda), log_pf, log_z, log_f, log_r, weights, reduction)


def gfn_loss(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie: Optional[Trie],
             log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor, objective: str = "tb",
             subtb_lambda: float = 0.9, weights: Optional[torch.Tensor] = None, support: str = "trie",
             **kwargs) -> GFNLossOutput:
    """The GFlowNet loss straight from hidden states, on the best backend: ``(loss, log_pf[T, L], backend)``.

    Same as :func:`gflowgr_core.objectives.gfn_loss` (``h[T, L, d]``, ``w_sid[sum K_l, d]``, ``codes[T, L]``,
    ``log_f[T, L-1]`` or ``None`` for TB, ``log_z[T]``, ``log_r[T]``; ``objective`` ``"tb"|"db"|"subtb"``;
    keyword options ``codes_per_level``, ``w_full``, ``sid_token_ids``, ``bias``, ``backend``).
    """
    return _gfn_loss(h, w_sid, codes, trie, log_f, log_z, log_r, objective, subtb_lambda, weights, support,
                     **kwargs)


# ------------------------------------------------------------------------------------------ SFT / preference
def _sequence_logp(x: torch.Tensor, name: str, dims: int) -> torch.Tensor:
    """Sequence log-probabilities: per-step ``[..., L]`` inputs are summed over the last dimension."""
    if x.dim() == dims + 1:
        return x.sum(dim=-1)
    if x.dim() != dims:
        raise ValueError(f"{name} must be {'[B]' if dims == 1 else '[B, N]'} sequence log-probabilities or "
                         f"{'[B, L]' if dims == 1 else '[B, N, L]'} per-step ones, got shape {tuple(x.shape)}")
    return x


def sft_cross_entropy(log_pf_pos: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SFT cross-entropy of the positives, ``mean_b(-sum_l mask * log_pf_pos)``.

    Args:
        log_pf_pos: ``[B, L]`` per-step log-probabilities of each example's positive SID (from
            :func:`constrained_log_pf`, so under the same support as the GFlowNet loss).
        mask: optional ``[B, L]`` of the steps that count.
    """
    return _preference.sft_cross_entropy(log_pf_pos, mask)


def dpo_loss(logp_pos: torch.Tensor, logp_neg: torch.Tensor, ref_pos: torch.Tensor, ref_neg: torch.Tensor,
             beta: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """DPO ``-log sigmoid(beta * [(pi_pos - ref_pos) - (pi_neg - ref_neg)])``.

    Each argument is ``[B]`` sequence log-probabilities or ``[B, L]`` per-step ones (summed here); the
    reference values are detached. ``reduction``: ``"mean"`` | ``"sum"`` | ``"none"``.
    """
    return _preference.dpo_loss(_sequence_logp(logp_pos, "logp_pos", 1), _sequence_logp(logp_neg, "logp_neg", 1),
                                _sequence_logp(ref_pos, "ref_pos", 1), _sequence_logp(ref_neg, "ref_neg", 1),
                                beta, reduction)


def sdpo_loss(logp_pos: torch.Tensor, logp_negs: torch.Tensor, ref_pos: torch.Tensor, ref_negs: torch.Tensor,
              beta: float = 1.0, neg_mask: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Softmax-DPO with ``N`` negatives: ``-log sigmoid(-log sum_j exp(beta * [(pi_j - ref_j) - (pi_pos -
    ref_pos)]))``.

    Args:
        logp_pos, ref_pos: ``[B]`` (or ``[B, L]`` per-step, summed).
        logp_negs, ref_negs: ``[B, N]`` (or ``[B, N, L]`` per-step, summed).
        beta: inverse temperature; neg_mask: optional ``[B, N]`` of the negatives that exist.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
    """
    return _preference.sdpo_loss(_sequence_logp(logp_pos, "logp_pos", 1), _sequence_logp(logp_negs, "logp_negs", 2),
                                 _sequence_logp(ref_pos, "ref_pos", 1), _sequence_logp(ref_negs, "ref_negs", 2),
                                 beta, neg_mask, reduction)


# ------------------------------------------------------------------------------------------ building blocks
def build_trie(codes: torch.Tensor, codes_per_level: Optional[Sequence[int]] = None, dense_levels: int = 2,
               backend: str = "auto") -> Trie:
    """The catalogue trie of ``codes`` (``LongTensor[n_items, L]``, row ``i`` = item ``i``), on
    ``codes.device``.

    ``codes_per_level`` defaults to ``max code + 1`` per level (pass the codebook sizes when some codes are
    unused, so the head rows line up). See :meth:`gflowgr_core.sid.trie.Trie.build`.
    """
    if codes_per_level is None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[0] == 0:
            raise ValueError(f"codes must be a non-empty [n_items, L] tensor, got "
                             f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        codes_per_level = [int(v) + 1 for v in codes.max(dim=0).values.tolist()]
    return Trie.build(codes, codes_per_level, dense_levels=dense_levels, backend=backend)


# T5-family models multiply the decoder output by d_model**-0.5 before the head in their original (tied)
# form; T5 v1.1 does not.
_T5_FAMILY = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def _decoder_output_scale(model) -> float:
    """Factor the model applies to the last hidden state before its head (1 for a plain linear head)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") not in _T5_FAMILY:
        return 1.0
    scaled = getattr(config, "scale_decoder_outputs", None)  # transformers >= 5.2x names it explicitly
    if scaled is None:
        scaled = bool(getattr(config, "tie_word_embeddings", False))
    return float(config.d_model) ** -0.5 if scaled else 1.0


def sid_head_rows(model, tokens: Union[SIDTokenMap, torch.Tensor]
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(w_sid[sum K_l, d], bias[sum K_l] | None)``: the output-embedding rows of the SID tokens, such that
    ``h @ w_sid.T + bias`` are the model's logits of the SID tokens for a last hidden state ``h``.

    A gather of ``model.get_output_embeddings()`` (keeps the gradient). ``tokens`` is a token map or the
    level-major ``sid_token_ids``. T5-family models that scale the decoder output by ``d_model**-0.5``
    before the head get that factor folded into ``w_sid``. Models whose logits are not a linear map of the
    hidden state (soft-capping, logit scales) raise ``ValueError``.
    """
    ids = tokens.sid_token_ids if isinstance(tokens, SIDTokenMap) else torch.as_tensor(tokens).long()
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            raise ValueError(f"{type(model).__name__} transforms its logits ({attr}={value}): SID-row logits "
                             f"of the hidden state would not match the model's distribution")
    ids = ids.to(head.weight.device)
    if int(ids.max()) >= head.weight.shape[0]:
        raise ValueError(f"SID token id {int(ids.max())} is outside the head's {head.weight.shape[0]} rows: resize "
                         f"the embeddings after adding the SID tokens")
    w_sid = head.weight.index_select(0, ids)
    scale = _decoder_output_scale(model)
    if scale != 1.0:
        w_sid = w_sid * scale
    bias = getattr(head, "bias", None)
    return w_sid, None if bias is None else bias.index_select(0, ids)


def decision_hidden(hidden: torch.Tensor, sid_start: Union[int, torch.Tensor], num_levels: int) -> torch.Tensor:
    """Hidden states at the ``L`` decision positions of a SID written at ``sid_start`` in each row.

    The token at position ``p`` is predicted from the hidden state at ``p - 1``, so the SID tokens at
    ``sid_start .. sid_start + L - 1`` are decided at ``sid_start - 1 .. sid_start + L - 2``.

    Args:
        hidden: ``[B, S, d]`` last-layer hidden states (after the final norm: ``hidden_states[-1]`` of HF
            models, or ``decoder_hidden_states[-1]``).
        sid_start: position of the first SID token, an int or ``LongTensor[B]`` (``>= 1``).
        num_levels: ``L``.
    Returns:
        ``[B, L, d]``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, S, d], got shape {tuple(hidden.shape)}")
    B, S, d = hidden.shape
    start = torch.as_tensor(sid_start, device=hidden.device).long()
    if start.dim() == 0:
        start = start.expand(B)
    if start.shape != (B,):
        raise ValueError(f"sid_start must be an int or [B] = [{B}], got shape {tuple(start.shape)}")
    pos = start[:, None] - 1 + torch.arange(num_levels, device=hidden.device)
    if bool(((pos < 0) | (pos >= S)).any()):
        raise ValueError(f"decision positions sid_start - 1 .. sid_start + {num_levels - 2} must lie in [0, {S}); "
                         f"sid_start needs to be in [1, {S - num_levels + 1}]")
    return hidden.gather(1, pos[:, :, None].expand(B, num_levels, d))


# ------------------------------------------------------------------------------------------ beam search
class BeamSearchOutput(NamedTuple):
    """Result of :func:`constrained_beam_search`, best first per row.

    ``codes[B, beams, L]`` (``-1`` for dead beams), ``scores[B, beams]`` (sum of the step log-probs,
    ``-inf`` for dead beams), ``leaves[B, beams]`` (trie leaf nodes, ``-1`` for dead beams; items via
    ``trie.items_of_leaves``).
    """

    codes: torch.Tensor
    scores: torch.Tensor
    leaves: torch.Tensor


StepFn = Callable[[int, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def constrained_beam_search(step: Union[StepFn, torch.nn.Module], trie: Trie, *, beams: int = 20,
                            batch_size: Optional[int] = None, w_sid: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None,
                            input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                            tokens: Union[SIDTokenMap, Sequence[torch.Tensor], None] = None,
                            end_token_id: Optional[int] = None, renormalize: bool = True,
                            backend: str = "auto", **generate_kwargs) -> BeamSearchOutput:
    """Trie-constrained beam search over SIDs, from an arbitrary step function or a Hugging Face model.

    **Step function** (``step`` is callable, not an HF model): the search runs the library's fused
    :func:`~gflowgr_core.decoding.constrained_step` level by level and calls
    ``step(level, prefix_codes[R, level], parent[R] | None) -> h[R, d]`` for the hidden state that decides
    the next code of each of the ``R`` current beams. Level 0 has ``R = batch_size`` rows (one per example,
    ``prefix_codes`` is ``[B, 0]``, ``parent`` is ``None``); level ``l >= 1`` has ``R = B * beams`` rows
    (row ``b * beams + i`` = beam ``i`` of example ``b``) and ``parent[r]`` is the row of the previous call
    it extends, so a step that keeps a KV cache reorders it with ``parent`` and appends
    ``prefix_codes[:, -1]``. Needs ``w_sid[sum K_l, d]`` (and ``bias``) and ``batch_size``.

    **HF model** (``step`` has ``generate``): runs stock ``model.generate`` beam search
    (``num_beams = num_return_sequences = beams``, ``length_penalty = 0``) with a
    :class:`~gflowgr_core.hf_processor.SIDTrieLogitsProcessor`; needs ``input_ids[B, P]`` (left-padded for a
    decoder-only model), ``attention_mask`` and ``tokens`` (a token map, or per-level token ids with
    ``end_token_id``). Extra keyword arguments go to ``generate``. The score of a beam is HF's sum of
    processed log-probs, including the forced end token (0 with ``renormalize=True``).

    Args:
        beams: beam width.
        renormalize: log-softmax over the trie children (the GFlowNet policy) or over all codes of the level
            (step function) / the whole vocabulary (HF model), masked to the children.
        backend: ``constrained_step`` backend for the step-function path.
    Returns:
        :class:`BeamSearchOutput` ``(codes[B, beams, L], scores[B, beams], leaves[B, beams])``.
    """
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    if hasattr(step, "generate"):
        return _hf_beam_search(step, trie, beams, input_ids, attention_mask, tokens, end_token_id, renormalize,
                               generate_kwargs)
    if not callable(step):
        raise TypeError(f"step must be a callable step(level, prefix_codes, parent) -> h or an HF model, got "
                        f"{type(step).__name__}")
    if generate_kwargs:
        raise TypeError(f"unexpected keyword arguments for a step function: {sorted(generate_kwargs)}")
    if w_sid is None or batch_size is None:
        raise ValueError("a step function needs w_sid [sum K_l, d] and batch_size")
    return _step_beam_search(step, trie, beams, int(batch_size), w_sid, bias, renormalize, backend)


def _step_beam_search(step: StepFn, trie: Trie, beams: int, batch_size: int, w_sid: torch.Tensor,
                      bias: Optional[torch.Tensor], renormalize: bool, backend: str) -> BeamSearchOutput:
    device = w_sid.device
    trie = trie.to(device)
    L = trie.num_levels
    offsets = _code_offsets(trie.codes_per_level)
    if w_sid.dim() != 2 or w_sid.shape[0] != offsets[-1]:
        raise ValueError(f"w_sid must be [sum K_l, d] = [{offsets[-1]}, d], got {tuple(w_sid.shape)}")
    if bias is not None and bias.shape != (offsets[-1],):
        raise ValueError(f"bias must be [sum K_l] = [{offsets[-1]}], got {tuple(bias.shape)}")
    name = backends.resolve_backend(_STEP_OP, backend, device).name
    B = batch_size
    node = torch.zeros(B, dtype=torch.long, device=device)
    scores = torch.zeros(B, 1, device=device)
    prefix = torch.zeros(B, 0, dtype=torch.long, device=device)
    parent_rows = None
    base = torch.arange(B, device=device)[:, None]
    for level in range(L):
        h = step(level, prefix, parent_rows)
        rows = prefix.shape[0]
        if h.dim() != 2 or h.shape != (rows, w_sid.shape[1]):
            raise ValueError(f"step(level={level}) returned shape {tuple(h.shape)}, expected [{rows}, "
                             f"{w_sid.shape[1]}] (one hidden state per current beam)")
        lo, hi = offsets[level], offsets[level + 1]
        out = constrained_step(h, w_sid[lo:hi], node, level, trie, "beam", scores=scores, beams=beams,
                               renormalize=renormalize, bias=None if bias is None else bias[lo:hi], backend=name)
        rows_in = scores.shape[1]
        parent_rows = (base * rows_in + out.parent).reshape(-1)
        prefix = torch.cat([prefix.index_select(0, parent_rows), out.code.reshape(-1, 1)], dim=1)
        node = out.next_node.reshape(-1)
        scores = out.score
    codes = prefix.reshape(B, beams, L)
    alive = torch.isfinite(scores)
    codes = torch.where(alive[..., None], codes, torch.full_like(codes, -1))
    return BeamSearchOutput(codes, scores, node.reshape(B, beams))


def _hf_beam_search(model, trie: Trie, beams: int, input_ids, attention_mask, tokens, end_token_id,
                    renormalize: bool, generate_kwargs: dict) -> BeamSearchOutput:
    if input_ids is None or tokens is None:
        raise ValueError("an HF model needs input_ids [B, P] and tokens (SIDTokenMap or per-level token ids)")
    for key in ("num_beams", "num_return_sequences", "logits_processor", "do_sample"):
        if key in generate_kwargs:
            raise ValueError(f"{key} is set by constrained_beam_search; do not pass it")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    prompt_length = 1 if encoder_decoder else input_ids.shape[1]
    proc = SIDTrieLogitsProcessor(trie, tokens, end_token_id=end_token_id, prompt_length=prompt_length,
                                  renormalize=renormalize)
    L = trie.num_levels
    kwargs = dict(max_new_tokens=L + 1, length_penalty=0.0, early_stopping=True,
                  eos_token_id=proc.end_token_id)
    kwargs.update(generate_kwargs)
    if kwargs.get("pad_token_id") is None:
        pad = getattr(model.generation_config, "pad_token_id", None)
        kwargs["pad_token_id"] = proc.end_token_id if pad is None else pad
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[proc],
                             num_beams=beams, num_return_sequences=beams, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
    B = input_ids.shape[0]
    seq = out.sequences
    codes = sids_from_sequences(seq, prompt_length, proc._per_level, trie).reshape(B, beams, L)
    scores = out.sequences_scores.reshape(B, beams).float()
    # HF seeds the extra beams of each row with score -1e9: beams still carrying it are copies, not SIDs.
    dead = (scores < -1e8) | (codes < 0).any(-1)
    scores = scores.masked_fill(dead, float("-inf"))
    codes = torch.where(dead[..., None], torch.full_like(codes, -1), codes)
    leaves = torch.where(dead, torch.full_like(scores, -1, dtype=torch.long),
                         trie.to(codes.device).leaf_of(codes.clamp_min(0)))
    return BeamSearchOutput(codes, scores, leaves)
