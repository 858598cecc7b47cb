"""Terminal reward R(s_L) of a trajectory set (METHOD.md §5).

For a training example with positive item ``v`` and a set of candidate items ``v'`` (the positive plus the
augmented trajectories), the reward of each candidate is fused from three components:

- ``r_a``   interaction value: ``r_pos`` for the positive item, ``r_aug`` (default 0) for any other item;
- ``r_cm``  collaborative score of ``v'`` for the user, already normalised to [0, 1] by the caller
            (``CMScorer.normalized(..., method=config.cm_norm)``), or, with ``cm_source="lm"``, the LM's
            own normalised generation probability (see :func:`lm_generation_prob`);
- ``r_sim`` number of position-wise matching *base* SID codes with the positive (the positive itself gets
            the number of base levels), optionally divided by it. The disambiguation level of a
            ``"suffix"`` catalogue is not a code of the item's content: two unrelated items both first in
            their SID group share it, so it is never compared.

Fusion ``sum`` (default) adds them; ``weighted`` takes ``w · components`` with fixed weights. The fused
reward is made strictly positive and bounded by ``R = clamp(R, min=eps, max=clip_max)``, then raised to
``beta``: ``log_r = beta · log R`` is the balance target, ``R^beta``.

Scale (METHOD.md §5 "Scale matters"): trajectory balance drives ``P_F(x | U)`` to ``R^beta(x) / Σ_x R^beta``
over the *whole* catalogue, so what matters is the positive's target share ``R^beta_pos / Σ_x R^beta``.
:meth:`Reward.catalogue_mass` computes ``log Σ_x R^beta`` for a batch of users (to initialise ``log Z`` and
to log the share), and ``r_pos_mode="catalogue"`` sets each positive's ``r_a`` so that its share is
``target_share``.

The reward is a fixed training *target*: every input is detached and it has no parameters, so no balance
loss can move it. (Fusion weights learned through the balance loss, which uses ``log R`` as its target,
collapse the reward onto the policy; weights are hyperparameters, to be chosen on validation.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from gflowgr_core.trajectories import Trajectories

__all__ = [
    "COMPONENTS",
    "CatalogueMass",
    "RewardConfig",
    "RewardError",
    "Reward",
    "cm_component",
    "lm_generation_prob",
    "summary",
]

#: Names of the fusable components, in the order used by the weights.
COMPONENTS = ("r_a", "r_cm", "r_sim")

_FUSIONS = ("sum", "weighted")
_CM_NORMS = ("sigmoid_z", "percentile", "softmax")
_CM_SOURCES = ("cm", "lm")
_R_POS_MODES = ("fixed", "catalogue")
# Tolerance on the [0, 1] range of normalised scores: float rounding of a sigmoid or a rank ratio.
_UNIT_TOL = 1e-5
# Bound on the B x chunk x L code comparisons (and B x chunk floats) held at once by catalogue_mass.
_MASS_CHUNK_ELEMS = 1 << 22

#: Normalised CM scores of the whole catalogue for a batch: ``float[B, n_items]``, or a callable
#: ``cm_fn(items: LongTensor[C]) -> float[B, C]`` giving them for a chunk of catalogue items.
CatalogueCM = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class RewardError(ValueError):
    """A reward input or component is invalid (NaN/inf, out of range, wrong shape)."""


@dataclass
class RewardConfig:
    """Every reward choice of METHOD.md §5 as a field.

    Attributes:
        r_pos: interaction value ``r_a`` of the positive item with ``r_pos_mode="fixed"`` (paper example:
            like 10, click 1; the academic datasets have one interaction type, default 1).
        r_pos_mode: ``"fixed"`` (default: ``r_a = r_pos``) or ``"catalogue"``: each positive's ``r_a`` is
            set so that its target share ``R^beta_pos / Σ_x R^beta(x)`` over the catalogue is
            ``target_share`` (needs the catalogue's reward mass, :meth:`Reward.catalogue_mass`; ``r_pos``
            is then unused). The share stays below ``target_share`` where ``clip_max`` caps ``R_pos``,
            and above it where the positive's ``r_cm``/``r_sim`` alone exceed the target (``r_a`` >= 0).
        target_share: the positive's share in ``"catalogue"`` mode, in (0, 1).
        r_aug: ``r_a`` of every non-positive candidate (paper: 0).
        cm_norm: how the caller normalises CM scores to [0, 1]: ``"sigmoid_z"`` (sigmoid of the score
            standardised over the catalogue), ``"percentile"`` (rank within the catalogue) or ``"softmax"``
            (``exp((s - max s) / cm_temperature)``: the CM's own catalogue distribution up to a per-user
            constant; with ``use_a=use_sim=False`` the balance loss distils the CM into the policy). Read by
            :func:`cm_component`; :class:`Reward` itself only checks that ``cm_norm`` lies in [0, 1].
        cm_temperature: temperature of ``cm_norm="softmax"`` (> 0; unused by the other two).
        cm_source: ``"cm"`` (collaborative model score, default) or ``"lm"`` (the LM's own normalised
            generation probability, supplied by the caller, e.g. from :func:`lm_generation_prob`).
        sim_normalize: divide ``r_sim`` by the number of base SID levels (the positive then gets 1).
        use_a, use_cm, use_sim: switch a component on/off (ablations). A disabled component is reported
            as zeros and left out of the fusion.
        fusion: ``"sum"`` | ``"weighted"``.
        weights: fixed weights of ``(r_a, r_cm, r_sim)`` for ``fusion="weighted"``; must be >= 0.
        learnable_weights: must be False. Fusion weights trained by the balance loss collapse the reward
            onto the policy (the loss can lower its residual by moving its own target); the field remains
            so that an old config asking for them gets this explanation rather than an unknown-key error.
        eps: lower clamp of the fused reward (R must be > 0 for log R).
        clip_max: upper clamp of the fused reward.
        beta: reward exponent, ``log_r = beta · log R`` (R^beta; ``1 / beta`` is a reward temperature).
    """

    r_pos: float = 1.0
    r_pos_mode: str = "fixed"
    target_share: float = 0.5
    r_aug: float = 0.0
    cm_norm: str = "sigmoid_z"
    cm_temperature: float = 1.0
    cm_source: str = "cm"
    sim_normalize: bool = False
    use_a: bool = True
    use_cm: bool = True
    use_sim: bool = True
    fusion: str = "sum"
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    learnable_weights: bool = False
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
        if self.fusion == "mlp":
            raise ValueError("RewardConfig.fusion='mlp' is not supported: a reward network trained by the "
                             "balance loss that uses log R as its target collapses onto the policy; use "
                             "fusion='sum' or fusion='weighted' with fixed weights")
        if self.fusion not in _FUSIONS:
            raise ValueError(f"RewardConfig.fusion must be one of {_FUSIONS}, got {self.fusion!r}")
        if self.learnable_weights:
            raise ValueError("RewardConfig.learnable_weights=True is not supported: fusion weights trained "
                             "by the balance loss that uses log R as its target collapse the reward onto the "
                             "policy; set learnable_weights=False and choose fixed weights (fusion='weighted', "
                             "weights=[w_a, w_cm, w_sim]) on validation")
        if self.cm_norm not in _CM_NORMS:
            raise ValueError(f"RewardConfig.cm_norm must be one of {_CM_NORMS}, got {self.cm_norm!r}")
        if self.cm_source not in _CM_SOURCES:
            raise ValueError(f"RewardConfig.cm_source must be one of {_CM_SOURCES}, got {self.cm_source!r}")
        if self.r_pos_mode not in _R_POS_MODES:
            raise ValueError(f"RewardConfig.r_pos_mode must be one of {_R_POS_MODES}, got {self.r_pos_mode!r}")
        if not any(self.enabled):
            raise ValueError("RewardConfig: at least one of use_a, use_cm, use_sim must be True")
        if not (math.isfinite(self.cm_temperature) and self.cm_temperature > 0):
            raise ValueError(f"RewardConfig.cm_temperature must be a finite number > 0, got {self.cm_temperature}")
        for name in ("r_pos", "r_aug", "eps", "clip_max", "beta", "target_share"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"RewardConfig.{name} must be finite, got {getattr(self, name)}")
        if not 0.0 < self.target_share < 1.0:
            raise ValueError(f"RewardConfig.target_share must be in (0, 1), got {self.target_share}")
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
        if self.r_pos_mode == "catalogue":
            w_a = self.weights[0] if self.fusion == "weighted" else 1.0
            if not self.use_a or w_a <= 0:
                raise ValueError("RewardConfig.r_pos_mode='catalogue' calibrates the positive through r_a: "
                                 f"it needs use_a=True and a weight of r_a > 0 (use_a={self.use_a}, "
                                 f"weights[r_a]={w_a})")

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


@dataclass
class CatalogueMass:
    """Reward mass of the whole catalogue for a batch of users (all ``float32[B]``, in log space).

    Attributes:
        log_pos: ``log R^beta`` of the positive, as :class:`Reward` gives it.
        log_rest: ``log Σ R^beta`` over every other catalogue item, leaving out the items whose SID equals the
            positive's (under ``"share"`` collisions they are the positive's terminal state, which the
            samplers never offer as an augmentation); ``-inf`` when there is none.
    """

    log_pos: torch.Tensor
    log_rest: torch.Tensor

    @property
    def log_total(self) -> torch.Tensor:
        """``log Σ_x R^beta(x)``, the ``log Z(U)`` that trajectory balance converges to."""
        return torch.logaddexp(self.log_pos, self.log_rest)

    @property
    def share(self) -> torch.Tensor:
        """The positive's target share ``R^beta_pos / Σ_x R^beta(x)`` in (0, 1]."""
        return torch.exp(self.log_pos - self.log_total)

    def log_mean_total(self) -> float:
        """``log`` of the batch mean of ``Σ_x R^beta(x)``: a data-driven initial value of ``log Z``."""
        n = self.log_pos.shape[0]
        if n == 0:
            raise RewardError("CatalogueMass of an empty batch has no mean")
        return float(torch.logsumexp(self.log_total.double(), dim=0) - math.log(n))


class Reward(nn.Module):
    """Fused, strictly positive reward of candidate items (METHOD.md §5).

    Args:
        config: a :class:`RewardConfig` (default: ``RewardConfig()``).
        base_levels: how many leading SID levels ``r_sim`` compares (the levels before a ``"suffix"``
            catalogue's disambiguation level, ``Catalog.base_levels``). ``None``: the ``base_levels`` of a
            Catalog passed as ``codes``, else every level of the codes tensor (right for ``"share"``
            catalogues such as LETTER's).

    The module has no parameters (see the module docstring); it is an ``nn.Module`` for ``.to(device)`` and
    checkpointing alongside the policy.
    """

    def __init__(self, config: RewardConfig | None = None, base_levels: int | None = None):
        super().__init__()
        self.config = config if config is not None else RewardConfig()
        self.config.validate()
        cfg = self.config
        if base_levels is not None and int(base_levels) < 1:
            raise RewardError(f"base_levels must be >= 1, got {base_levels}")
        self.base_levels = None if base_levels is None else int(base_levels)
        self.register_buffer("_enabled", torch.tensor(cfg.enabled, dtype=torch.bool), persistent=False)
        if cfg.fusion == "weighted":
            self.register_buffer("fixed_weights", torch.tensor(cfg.weights, dtype=torch.float32))

    def weights(self) -> torch.Tensor:
        """Fusion weights ``[3]`` of ``(r_a, r_cm, r_sim)`` (ones for ``sum``; zeros where disabled)."""
        if self.config.fusion == "sum":
            w = torch.ones(len(COMPONENTS), device=self._enabled.device)
        else:
            w = self.fixed_weights
        return torch.where(self._enabled, w, torch.zeros_like(w))

    # ------------------------------------------------------------------------------------ internals
    def _levels(self, codes: Any, n_levels: int) -> int:
        """The number of leading SID levels ``r_sim`` compares, checked against the codes."""
        of_catalog = getattr(codes, "base_levels", None)
        if self.base_levels is not None and of_catalog is not None and int(of_catalog) != self.base_levels:
            raise RewardError(f"Reward(base_levels={self.base_levels}) but the catalogue passed as codes has "
                              f"base_levels={of_catalog}")
        levels = self.base_levels if self.base_levels is not None else (
            int(of_catalog) if of_catalog is not None else n_levels)
        if levels > n_levels:
            raise RewardError(f"base_levels={levels} exceeds the {n_levels} SID levels of the codes")
        return levels

    def _sim(self, cand_codes: torch.Tensor, pos_codes: torch.Tensor, levels: int) -> torch.Tensor:
        """``r_sim`` of ``cand_codes[..., L]`` against broadcastable ``pos_codes[..., L]``: base levels only."""
        r = (cand_codes[..., :levels] == pos_codes[..., :levels]).sum(dim=-1).to(torch.float32)
        return r / levels if self.config.sim_normalize else r

    def _fuse(self, r_a: torch.Tensor, r_cm: torch.Tensor, r_sim: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(r_sim.device)
        return w[0] * r_a + w[1] * r_cm + w[2] * r_sim

    def _log_target(self, r_raw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return cfg.beta * torch.log(r_raw.clamp(min=cfg.eps, max=cfg.clip_max))

    def _positive_r_a(self, base: torch.Tensor, log_rest: torch.Tensor | None) -> torch.Tensor:
        """``r_a`` of the positive given its fused reward without ``r_a`` (``base[B, ...]``).

        ``"catalogue"`` mode solves ``R^beta_pos = share / (1 - share) · exp(log_rest)`` for ``r_a`` (the
        fusion is linear in ``r_a``), with ``R_pos`` capped at ``clip_max`` and ``r_a`` kept >= 0.
        """
        cfg = self.config
        if not cfg.use_a:
            return torch.zeros_like(base)
        if cfg.r_pos_mode == "fixed":
            return torch.full_like(base, cfg.r_pos)
        log_rest = log_rest.reshape(log_rest.shape + (1,) * (base.dim() - 1))
        log_goal = math.log(cfg.target_share / (1.0 - cfg.target_share)) + log_rest
        r_goal = torch.exp(torch.clamp(log_goal / cfg.beta, max=math.log(cfg.clip_max)))
        return ((r_goal - base) / self.weights()[0].to(base.device)).clamp(min=0.0)

    def _check_log_rest(self, log_rest: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor | None:
        if self.config.r_pos_mode != "catalogue":
            return None
        if log_rest is None:
            raise RewardError("r_pos_mode='catalogue' needs log_rest[B] (Reward.catalogue_mass(...).log_rest) "
                              "to set the positive's reward")
        if not isinstance(log_rest, torch.Tensor) or tuple(log_rest.shape) != (B,):
            raise RewardError(f"log_rest must be a float tensor [B={B}], got "
                              f"{tuple(getattr(log_rest, 'shape', ())) or type(log_rest).__name__}")
        log_rest = log_rest.detach().to(device=device, dtype=torch.float32)
        bad = torch.isnan(log_rest) | (log_rest == float("inf"))
        if bool(bad.any()):
            raise RewardError(f"log_rest must be finite or -inf; {_rows_text(bad)} hold "
                              f"{log_rest[bad][:5].tolist()}")
        return log_rest

    def _check_cm(self, r_cm: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Validated, detached float32 copy of normalised CM scores of the expected ``shape``."""
        cfg = self.config
        if not isinstance(r_cm, torch.Tensor) or tuple(r_cm.shape) != tuple(shape):
            raise RewardError(f"cm_norm must have the shape of candidates {tuple(shape)}, got "
                              f"{tuple(getattr(r_cm, 'shape', ())) or type(r_cm).__name__}")
        r_cm = r_cm.detach().to(device=device, dtype=torch.float32)
        _check_finite("cm_norm", r_cm)
        out = (r_cm < -_UNIT_TOL) | (r_cm > 1 + _UNIT_TOL)
        if bool(out.any()):
            raise RewardError(f"cm_norm must be normalised to [0, 1] (source {cfg.cm_source!r}); "
                              f"{_rows_text(out)} hold {r_cm[out][:5].tolist()}")
        return r_cm.clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------- public API
    def components(self, positive: torch.Tensor, candidates: torch.Tensor, cm_norm: torch.Tensor | None,
                   codes: Any, log_rest: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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
        levels = self._levels(codes, n_levels)
        _check_items("positive", positive, n_items)
        _check_items("candidates", candidates, n_items)
        device = candidates.device
        positive = positive.to(device)
        shape = candidates.shape
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)
        log_rest = self._check_log_rest(log_rest, shape[0], device)

        if cfg.use_cm:
            if cm_norm is None:
                raise RewardError(f"use_cm=True needs cm_norm[B, T] (source {cfg.cm_source!r}); pass the "
                                  "normalised scores or set use_cm=False")
            r_cm = self._check_cm(cm_norm, shape, device)
        else:
            r_cm = zeros

        if cfg.use_sim:
            # Gather on the catalogue's device and move only the [B, T, L] slice.
            cand_codes = codes_t[candidates.to(codes_t.device)].to(device)
            pos_codes = codes_t[positive.to(codes_t.device)].to(device)
            r_sim = self._sim(cand_codes, pos_codes[:, None, :], levels)
        else:
            r_sim = zeros

        is_pos = candidates == positive[:, None]
        if cfg.use_a:
            r_a_pos = self._positive_r_a(self._fuse(zeros, r_cm, r_sim), log_rest)
            r_a = torch.where(is_pos, r_a_pos, torch.full_like(zeros, cfg.r_aug))
        else:
            r_a = zeros
        return {"r_a": r_a, "r_cm": r_cm, "r_sim": r_sim}

    def forward(self, positive: torch.Tensor, candidates: torch.Tensor, cm_norm: torch.Tensor | None,
                codes: Any, log_rest: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reward of every candidate.

        Args:
            positive: ``LongTensor[B]`` the logged positive item of each example.
            candidates: ``LongTensor[B, T]`` items to reward (``candidates[:, 0]`` is usually the positive,
                the rest the augmented items); every entry must be a catalogue item.
            cm_norm: ``float[B, T]`` in [0, 1]: the normalised CM score of each candidate (or the LM's
                normalised generation probability with ``cm_source="lm"``); may be ``None`` when
                ``use_cm=False``. Detached.
            codes: ``LongTensor[n_items, L]`` SID codes of the catalogue, or a Catalog.
            log_rest: ``float[B]``, needed with ``r_pos_mode="catalogue"`` (ignored otherwise): the
                catalogue's reward mass besides the positive, ``catalogue_mass(...).log_rest``.

        Returns:
            ``(log_r, components)``: ``log_r`` ``float32[B, T]`` = ``beta · log clamp(R, eps, clip_max)``,
            never requiring grad; ``components`` maps ``r_a``, ``r_cm``, ``r_sim`` (disabled ones zero),
            ``R_raw`` (fused, before the clamp) and ``R`` (after the clamp, before ``beta``) to
            ``float32[B, T]`` tensors.

        Raises:
            RewardError: NaN/inf in ``cm_norm`` or in any component, naming it and the batch rows;
                out-of-range items; shape mismatches; a missing ``log_rest`` in ``"catalogue"`` mode.
        """
        cfg = self.config
        comps = self.components(positive, candidates, cm_norm, codes, log_rest)
        r_raw = self._fuse(comps["r_a"], comps["r_cm"], comps["r_sim"])
        for name in COMPONENTS:
            _check_finite(name, comps[name])
        _check_finite("R", r_raw)
        log_r = self._log_target(r_raw).detach()
        comps["R_raw"] = r_raw
        comps["R"] = r_raw.clamp(min=cfg.eps, max=cfg.clip_max)
        return log_r, comps

    def score_trajectories(self, trajectories: Trajectories, cm_norm: torch.Tensor | None, codes: Any,
                           log_rest: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` on the items of :class:`~gflowgr_core.trajectories.Trajectories`: the reward of
        every trajectory, ``(log_r[B, T], components)``, against its example's positive."""
        return self(trajectories.positive, trajectories.items, cm_norm, codes, log_rest=log_rest)

    @torch.no_grad()
    def catalogue_mass(self, positive: torch.Tensor, cm_all: CatalogueCM | None, codes: Any,
                       chunk_elems: int = _MASS_CHUNK_ELEMS) -> CatalogueMass:
        """``log Σ_x R^beta(x)`` over the whole catalogue for each example, split into the positive's term
        and the rest (:class:`CatalogueMass`).

        Every item is rewarded as :meth:`forward` would reward it as a candidate of that example, with
        ``r_a = r_aug`` for the items other than the positive. Work is chunked over the catalogue so that
        ``B x chunk x L`` stays under ``chunk_elems``.

        Args:
            positive: ``LongTensor[B]``.
            cm_all: the normalised CM scores (in [0, 1]) of every item for every example: ``float[B, n_items]``
                or ``cm_fn(items: LongTensor[C]) -> float[B, C]``; ``None`` only with ``use_cm=False``.
            codes: ``LongTensor[n_items, L]`` or a Catalog.
            chunk_elems: bound on the elements of one chunk's code comparison.

        Use: ``log Z`` initialised to ``mass.log_mean_total()`` over a sample of training examples; per step
        ``mass.share.mean()`` (the positive's target share) and, with ``r_pos_mode="catalogue"``,
        ``forward(..., log_rest=mass.log_rest)``.
        """
        cfg = self.config
        codes_t = _codes_tensor(codes)
        if positive.dim() != 1 or positive.dtype.is_floating_point or positive.dtype == torch.bool:
            raise RewardError(f"positive must be an integer tensor [B], got {positive.dtype}{tuple(positive.shape)}")
        n_items, n_levels = codes_t.shape
        levels = self._levels(codes, n_levels)
        _check_items("positive", positive, n_items)
        if cfg.use_cm and cm_all is None:
            raise RewardError(f"use_cm=True needs the normalised CM score of every item (cm_all[B, {n_items}] or "
                              f"a callable; source {cfg.cm_source!r})")
        if cm_all is not None and not callable(cm_all) and not isinstance(cm_all, torch.Tensor):
            raise RewardError(f"cm_all must be a tensor [B, n_items] or a callable, got {type(cm_all).__name__}")
        device = positive.device
        B = positive.shape[0]
        pos_codes = codes_t[positive.to(codes_t.device)].to(device)            # [B, L]
        log_rest = torch.full((B,), float("-inf"), device=device)
        cm_pos = torch.zeros(B, device=device)
        chunk = max(1, int(chunk_elems) // max(1, B * n_levels))
        for start in range(0, n_items, chunk):
            stop = min(n_items, start + chunk)
            items = torch.arange(start, stop, device=codes_t.device)
            item_codes = codes_t[items].to(device)                                # [C, L]
            zeros = torch.zeros((B, stop - start), device=device)
            if cfg.use_cm:
                r_cm = cm_all[:, start:stop] if isinstance(cm_all, torch.Tensor) else cm_all(items.to(device))
                r_cm = self._check_cm(r_cm, (B, stop - start), device)
                here = (positive >= start) & (positive < stop)
                own = r_cm.gather(1, (positive - start).clamp(0, stop - start - 1)[:, None])[:, 0]
                cm_pos = torch.where(here, own, cm_pos)
            else:
                r_cm = zeros
            r_sim = self._sim(item_codes[None], pos_codes[:, None, :], levels) if cfg.use_sim else zeros
            r_a = torch.full_like(zeros, cfg.r_aug) if cfg.use_a else zeros
            r_raw = self._fuse(r_a, r_cm, r_sim)
            _check_finite("R", r_raw)
            log_r = self._log_target(r_raw)
            same_sid = (item_codes[None] == pos_codes[:, None, :]).all(dim=-1)  # the positive's terminal state
            log_r = log_r.masked_fill(same_sid, float("-inf"))
            log_rest = torch.logaddexp(log_rest, torch.logsumexp(log_r, dim=1))
        # The positive against itself: every base level matches; disabled components have weight 0.
        own_sim = torch.full((B,), 1.0 if cfg.sim_normalize else float(levels), device=device)
        r_a_pos = self._positive_r_a(self._fuse(torch.zeros_like(cm_pos), cm_pos, own_sim), log_rest)
        r_pos_raw = self._fuse(r_a_pos, cm_pos, own_sim)
        _check_finite("R", r_pos_raw)
        return CatalogueMass(log_pos=self._log_target(r_pos_raw), log_rest=log_rest)

    def extra_repr(self) -> str:
        cfg = self.config
        on = [n for n, e in zip(COMPONENTS, cfg.enabled) if e]
        return (f"fusion={cfg.fusion}, components={on}, r_pos_mode={cfg.r_pos_mode}, eps={cfg.eps}, "
                f"clip_max={cfg.clip_max}, beta={cfg.beta}, base_levels={self.base_levels}")


def cm_component(config: RewardConfig, scorer: Any, example_idx: torch.Tensor,
                 candidates: torch.Tensor) -> torch.Tensor | None:
    """The ``cm_norm[B, T]`` input of :class:`Reward` for ``cm_source="cm"``.

    Calls ``scorer.normalized(example_idx[B], candidates[B, T], method=config.cm_norm)`` (a ``CMScorer``), with
    ``temperature=config.cm_temperature`` for ``cm_norm="softmax"``.
    Returns ``None`` when ``use_cm`` is off. With ``cm_source="lm"`` the caller must supply the LM
    probability instead (see :func:`lm_generation_prob`), so this raises ``RewardError``.
    """
    if not config.use_cm:
        return None
    if config.cm_source != "cm":
        raise RewardError("cm_source='lm': supply the LM's normalised generation probability "
                          "(lm_generation_prob) as cm_norm instead of CM scores")
    with torch.no_grad():
        if config.cm_norm == "softmax":  # the only method with a temperature; other scorers need not take one
            return scorer.normalized(example_idx, candidates, method="softmax", temperature=config.cm_temperature)
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
