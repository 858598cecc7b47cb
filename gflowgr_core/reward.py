"""Terminal reward R(s_L) of a trajectory set (METHOD.md §5).

For a training example with positive item ``v`` and a set of candidate items ``v'`` (the positive plus the
augmented trajectories), the reward of each candidate is fused from three components:

- ``r_a``   interaction value: ``r_pos`` for the positive item, ``r_aug`` (default 0) for any other item;
- ``r_cm``  collaborative score of ``v'`` for the user, already normalised to [0, 1] by the caller
            (``CMScorer.normalized(..., method=config.cm_norm)``), or, with ``cm_source="lm"``, the LM's
            own normalised generation probability (see :func:`lm_generation_prob`);
- ``r_sim`` number of position-wise matching SID codes with the positive (the positive itself gets L),
            optionally divided by L.

Fusion ``sum`` (default) adds them; ``weighted`` takes ``w · components`` with fixed weights or learnable
softplus weights; ``mlp`` runs a small MLP with a softplus output over the component vector. The fused
reward is made strictly positive and bounded by ``R = clamp(R, min=eps, max=clip_max)``, then raised to
``beta``: ``log_r = beta · log R``.

The reward is a training *target*: every input is detached, and gradients reach only the learnable parts
of the fusion (learnable weights, MLP), which are ``nn.Parameter``s of :class:`Reward`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "COMPONENTS",
    "RewardConfig",
    "RewardError",
    "Reward",
    "cm_component",
    "lm_generation_prob",
    "summary",
]

#: Names of the fusable components, in the order used by weights and the MLP input.
COMPONENTS = ("r_a", "r_cm", "r_sim")

_FUSIONS = ("sum", "weighted", "mlp")
_CM_NORMS = ("sigmoid_z", "percentile")
_CM_SOURCES = ("cm", "lm")
# Tolerance on the [0, 1] range of normalised scores: float rounding of a sigmoid or a rank ratio.
_UNIT_TOL = 1e-5


class RewardError(ValueError):
    """A reward input or component is invalid (NaN/inf, out of range, wrong shape)."""


@dataclass
class RewardConfig:
    """Every reward choice of METHOD.md §5 as a field.

    Attributes:
        r_pos: interaction value ``r_a`` of the positive item (paper example: like 10, click 1; the
            academic datasets have one interaction type, default 1).
        r_aug: ``r_a`` of every non-positive candidate (paper: 0).
        cm_norm: how the caller normalises CM scores to [0, 1]: ``"sigmoid_z"`` (sigmoid of the score
            standardised over the pool) or ``"percentile"`` (rank within the pool). Read by
            :func:`cm_component`; :class:`Reward` itself only checks that ``cm_norm`` lies in [0, 1].
        cm_source: ``"cm"`` (collaborative model score, default) or ``"lm"`` (the LM's own normalised
            generation probability, supplied by the caller, e.g. from :func:`lm_generation_prob`).
        sim_normalize: divide ``r_sim`` by the number of SID levels L (the positive then gets 1).
        use_a, use_cm, use_sim: switch a component on/off (ablations). A disabled component is reported
            as zeros and left out of the fusion (and out of the MLP input).
        fusion: ``"sum"`` | ``"weighted"`` | ``"mlp"``.
        weights: fixed weights of ``(r_a, r_cm, r_sim)`` for ``fusion="weighted"``, and the initial value of
            the learnable weights; must be >= 0 (> 0 for enabled components when learnable).
        learnable_weights: with ``fusion="weighted"``, learn ``w = softplus(raw)`` (raw initialised so that
            ``w`` starts at ``weights``).
        mlp_hidden: hidden width of the ``fusion="mlp"`` network.
        eps: lower clamp of the fused reward (R must be > 0 for log R).
        clip_max: upper clamp of the fused reward.
        beta: reward exponent, ``log_r = beta · log R`` (R^beta).
    """

    r_pos: float = 1.0
    r_aug: float = 0.0
    cm_norm: str = "sigmoid_z"
    cm_source: str = "cm"
    sim_normalize: bool = False
    use_a: bool = True
    use_cm: bool = True
    use_sim: bool = True
    fusion: str = "sum"
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    learnable_weights: bool = False
    mlp_hidden: int = 16
    eps: float = 1e-4
    clip_max: float = 1e4
    beta: float = 1.0

    def __post_init__(self) -> None:
        self.weights = tuple(float(w) for w in self.weights)
        self.validate()

    @property
    def enabled(self) -> tuple[bool, bool, bool]:
        """On/off flags of ``(r_a, r_cm, r_sim)``."""
        return (self.use_a, self.use_cm, self.use_sim)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is outside its domain."""
        if self.fusion not in _FUSIONS:
            raise ValueError(f"RewardConfig.fusion must be one of {_FUSIONS}, got {self.fusion!r}")
        if self.cm_norm not in _CM_NORMS:
            raise ValueError(f"RewardConfig.cm_norm must be one of {_CM_NORMS}, got {self.cm_norm!r}")
        if self.cm_source not in _CM_SOURCES:
            raise ValueError(f"RewardConfig.cm_source must be one of {_CM_SOURCES}, got {self.cm_source!r}")
        if not any(self.enabled):
            raise ValueError("RewardConfig: at least one of use_a, use_cm, use_sim must be True")
        for name in ("r_pos", "r_aug", "eps", "clip_max", "beta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"RewardConfig.{name} must be finite, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"RewardConfig.eps must be > 0 (R is clamped to >= eps), got {self.eps}")
        if self.clip_max <= self.eps:
            raise ValueError(f"RewardConfig.clip_max must be > eps={self.eps}, got {self.clip_max}")
        if self.beta <= 0:
            raise ValueError(f"RewardConfig.beta must be > 0, got {self.beta}")
        if len(self.weights) != len(COMPONENTS):
            raise ValueError(f"RewardConfig.weights needs {len(COMPONENTS)} values {COMPONENTS}, "
                             f"got {self.weights}")
        for name, w in zip(COMPONENTS, self.weights):
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"RewardConfig.weights[{name}] must be finite and >= 0, got {w}")
        if self.fusion == "weighted" and self.learnable_weights:
            for name, w, on in zip(COMPONENTS, self.weights, self.enabled):
                if on and w <= 0:
                    raise ValueError(f"RewardConfig.weights[{name}] must be > 0 with learnable_weights "
                                     f"(softplus weights cannot start at {w})")
        if self.mlp_hidden < 1:
            raise ValueError(f"RewardConfig.mlp_hidden must be >= 1, got {self.mlp_hidden}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for YAML/JSON configs and checkpoints)."""
        d = asdict(self)
        d["weights"] = list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RewardConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RewardConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "weights" in d:
            d["weights"] = tuple(d["weights"])
        return cls(**d)


def _bad_rows(bad: torch.Tensor, limit: int = 5) -> tuple[list[int], int]:
    """Batch rows (dim 0) where ``bad`` has any True: the first ``limit`` of them and their total count."""
    per_row = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 0 else bad.reshape(1)
    rows = per_row.nonzero().flatten()
    return rows[:limit].tolist(), int(rows.numel())


def _rows_text(bad: torch.Tensor) -> str:
    rows, n = _bad_rows(bad)
    return f"batch row(s) {rows}" + (f" and {n - len(rows)} more" if n > len(rows) else "")


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = t[bad][0].item()
        raise RewardError(f"reward component {name!r} is not finite (first bad value {first}) at "
                          f"{_rows_text(bad)}")


def _codes_tensor(codes: Any) -> torch.Tensor:
    """Accept a ``LongTensor[n_items, L]`` or anything with a ``.codes`` tensor (a Catalog)."""
    t = getattr(codes, "codes", codes)
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise RewardError("codes must be an integer tensor [n_items, L] (Catalog.codes), got "
                          f"{type(t).__name__}{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
    return t


def _check_items(name: str, items: torch.Tensor, n_items: int) -> None:
    bad = (items < 0) | (items >= n_items)
    if bool(bad.any()):
        raise RewardError(f"{name} must hold catalogue items in [0, {n_items}); {_rows_text(bad)} hold "
                          f"{items[bad][:5].tolist()}")


class Reward(nn.Module):
    """Fused, strictly positive reward of candidate items (METHOD.md §5).

    Args:
        config: a :class:`RewardConfig` (default: ``RewardConfig()``).

    Learnable parts (``fusion="weighted"`` with ``learnable_weights``, or ``fusion="mlp"``) are parameters
    of this module: put them in the optimiser to learn them.
    """

    def __init__(self, config: RewardConfig | None = None):
        super().__init__()
        self.config = config if config is not None else RewardConfig()
        self.config.validate()
        cfg = self.config
        self.register_buffer("_enabled", torch.tensor(cfg.enabled, dtype=torch.bool), persistent=False)
        self.raw_weights: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if cfg.fusion == "weighted":
            w = torch.tensor(cfg.weights, dtype=torch.float32)
            if cfg.learnable_weights:
                # Inverse softplus so that softplus(raw) == w at the start; disabled components keep a
                # placeholder that never reaches the fused reward.
                w = torch.where(self._enabled, w, torch.ones_like(w))
                self.raw_weights = nn.Parameter(w + torch.log(-torch.expm1(-w)))
            else:
                self.register_buffer("fixed_weights", w)
        elif cfg.fusion == "mlp":
            n_in = sum(cfg.enabled)
            self.mlp = nn.Sequential(nn.Linear(n_in, cfg.mlp_hidden), nn.SiLU(), nn.Linear(cfg.mlp_hidden, 1))

    def weights(self) -> torch.Tensor:
        """Current fusion weights ``[3]`` of ``(r_a, r_cm, r_sim)`` (ones for ``sum``; zeros where disabled).

        Raises ``RewardError`` for ``fusion="mlp"``, which has no per-component weights.
        """
        cfg = self.config
        if cfg.fusion == "mlp":
            raise RewardError("fusion='mlp' has no per-component weights")
        if cfg.fusion == "sum":
            w = torch.ones(len(COMPONENTS), device=self._enabled.device)
        elif self.raw_weights is not None:
            w = F.softplus(self.raw_weights)
        else:
            w = self.fixed_weights
        return torch.where(self._enabled, w, torch.zeros_like(w))

    def components(self, positive: torch.Tensor, candidates: torch.Tensor, cm_norm: torch.Tensor | None,
                   codes: Any) -> dict[str, torch.Tensor]:
        """The unfused components, each ``float32[B, T]``: ``r_a``, ``r_cm``, ``r_sim``.

        Disabled components are zeros. Inputs are validated as in :meth:`forward`.
        """
        cfg = self.config
        codes_t = _codes_tensor(codes)
        if positive.dim() != 1 or candidates.dim() != 2 or candidates.shape[0] != positive.shape[0]:
            raise RewardError(f"expected positive[B] and candidates[B, T], got {tuple(positive.shape)} and "
                              f"{tuple(candidates.shape)}")
        for name, t in (("positive", positive), ("candidates", candidates)):
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise RewardError(f"{name} must be an integer (item index) tensor, got {t.dtype}")
        n_items, n_levels = codes_t.shape
        _check_items("positive", positive, n_items)
        _check_items("candidates", candidates, n_items)
        device = candidates.device
        positive = positive.to(device)
        shape = candidates.shape
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)

        is_pos = candidates == positive[:, None]
        r_a = torch.where(is_pos, torch.full_like(zeros, cfg.r_pos), torch.full_like(zeros, cfg.r_aug)) \
            if cfg.use_a else zeros

        if cfg.use_cm:
            if cm_norm is None:
                raise RewardError(f"use_cm=True needs cm_norm[B, T] (source {cfg.cm_source!r}); pass the "
                                  "normalised scores or set use_cm=False")
            if tuple(cm_norm.shape) != tuple(shape):
                raise RewardError(f"cm_norm must have the shape of candidates {tuple(shape)}, got "
                                  f"{tuple(cm_norm.shape)}")
            r_cm = cm_norm.detach().to(device=device, dtype=torch.float32)
            _check_finite("cm_norm", r_cm)
            out = (r_cm < -_UNIT_TOL) | (r_cm > 1 + _UNIT_TOL)
            if bool(out.any()):
                raise RewardError(f"cm_norm must be normalised to [0, 1] (source {cfg.cm_source!r}); "
                                  f"{_rows_text(out)} hold {r_cm[out][:5].tolist()}")
            r_cm = r_cm.clamp(0.0, 1.0)
        else:
            r_cm = zeros

        if cfg.use_sim:
            # Gather on the catalogue's device and move only the [B, T, L] slice.
            cand_codes = codes_t[candidates.to(codes_t.device)].to(device)
            pos_codes = codes_t[positive.to(codes_t.device)].to(device)
            match = cand_codes == pos_codes[:, None, :]  # [B, T, L]
            r_sim = match.sum(dim=-1).to(torch.float32)
            if cfg.sim_normalize:
                r_sim = r_sim / n_levels
        else:
            r_sim = zeros
        return {"r_a": r_a, "r_cm": r_cm, "r_sim": r_sim}

    def forward(self, positive: torch.Tensor, candidates: torch.Tensor, cm_norm: torch.Tensor | None,
                codes: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reward of every candidate.

        Args:
            positive: ``LongTensor[B]`` the logged positive item of each example.
            candidates: ``LongTensor[B, T]`` items to reward (``candidates[:, 0]`` is usually the positive,
                the rest the augmented items); every entry must be a catalogue item.
            cm_norm: ``float[B, T]`` in [0, 1]: the normalised CM score of each candidate (or the LM's
                normalised generation probability with ``cm_source="lm"``); may be ``None`` when
                ``use_cm=False``. Detached.
            codes: ``LongTensor[n_items, L]`` SID codes of the catalogue, or a Catalog.

        Returns:
            ``(log_r, components)``: ``log_r`` ``float32[B, T]`` = ``beta · log clamp(R, eps, clip_max)``;
            ``components`` maps ``r_a``, ``r_cm``, ``r_sim`` (disabled ones zero), ``R_raw`` (fused, before
            the clamp) and ``R`` (after the clamp, before ``beta``) to ``float32[B, T]`` tensors.

        Raises:
            RewardError: NaN/inf in ``cm_norm`` or in any component, naming it and the batch rows;
                out-of-range items; shape mismatches.
        """
        cfg = self.config
        comps = self.components(positive, candidates, cm_norm, codes)
        stacked = torch.stack([comps[n] for n in COMPONENTS], dim=-1)  # [B, T, 3]
        if cfg.fusion == "mlp":
            mlp_device = self.mlp[0].weight.device
            if mlp_device != stacked.device:
                raise RewardError(f"fusion='mlp': the reward MLP is on {mlp_device} but the candidates are on "
                                  f"{stacked.device}; move the Reward module with .to(device)")
            x = stacked[..., self._enabled.to(stacked.device)]
            r_raw = F.softplus(self.mlp(x).squeeze(-1))
        else:
            r_raw = (stacked * self.weights().to(stacked.device)).sum(dim=-1)
        for name in COMPONENTS:
            _check_finite(name, comps[name])
        _check_finite("R", r_raw)
        r = r_raw.clamp(min=cfg.eps, max=cfg.clip_max)
        log_r = cfg.beta * torch.log(r)
        comps["R_raw"] = r_raw
        comps["R"] = r
        return log_r, comps

    def extra_repr(self) -> str:
        cfg = self.config
        on = [n for n, e in zip(COMPONENTS, cfg.enabled) if e]
        return f"fusion={cfg.fusion}, components={on}, eps={cfg.eps}, clip_max={cfg.clip_max}, beta={cfg.beta}"


def cm_component(config: RewardConfig, scorer: Any, example_idx: torch.Tensor,
                 candidates: torch.Tensor) -> torch.Tensor | None:
    """The ``cm_norm[B, T]`` input of :class:`Reward` for ``cm_source="cm"``.

    Calls ``scorer.normalized(example_idx[B], candidates[B, T], method=config.cm_norm)`` (a ``CMScorer``).
    Returns ``None`` when ``use_cm`` is off. With ``cm_source="lm"`` the caller must supply the LM
    probability instead (see :func:`lm_generation_prob`), so this raises ``RewardError``.
    """
    if not config.use_cm:
        return None
    if config.cm_source != "cm":
        raise RewardError("cm_source='lm': supply the LM's normalised generation probability "
                          "(lm_generation_prob) as cm_norm instead of CM scores")
    with torch.no_grad():
        return scorer.normalized(example_idx, candidates, method=config.cm_norm)


def lm_generation_prob(step_logp: torch.Tensor) -> torch.Tensor:
    """The LM's normalised generation probability of whole SIDs, for ``cm_source="lm"``.

    Args:
        step_logp: ``float[..., L]`` per-step log P_F of each candidate's SID codes.

    Returns:
        ``float32[...]`` in (0, 1]: the per-step geometric mean ``exp(mean_l log P_F)``, detached (the
        length normalisation keeps it comparable across SID lengths and away from underflow).
    """
    if step_logp.dim() < 1 or step_logp.shape[-1] == 0:
        raise RewardError(f"step_logp must be [..., L] with L >= 1, got {tuple(step_logp.shape)}")
    logp = step_logp.detach().float()
    _check_finite("step_logp", logp)
    if bool((logp > 1e-6).any()):
        raise RewardError("step_logp must be log-probabilities (<= 0); got positive values "
                          f"{logp[logp > 1e-6][:5].tolist()}")
    return logp.mean(dim=-1).clamp(max=0.0).exp()


def summary(components: Mapping[str, torch.Tensor], prefix: str = "reward/") -> dict[str, float]:
    """Per-component statistics for logging: ``{prefix}{name}/{mean,std,min,max}`` for every tensor.

    When both ``R_raw`` and ``R`` are present, also ``{prefix}clamped_frac``: the share of candidates whose
    fused reward was changed by the ``[eps, clip_max]`` clamp.
    """
    out: dict[str, float] = {}
    for name, t in components.items():
        x = t.detach().float().flatten()
        if x.numel() == 0:
            continue
        out[f"{prefix}{name}/mean"] = x.mean().item()
        out[f"{prefix}{name}/std"] = x.std(correction=0).item()
        out[f"{prefix}{name}/min"] = x.min().item()
        out[f"{prefix}{name}/max"] = x.max().item()
    if "R_raw" in components and "R" in components and components["R"].numel() > 0:
        changed = components["R_raw"].detach() != components["R"].detach()
        out[f"{prefix}clamped_frac"] = changed.float().mean().item()
    return out
