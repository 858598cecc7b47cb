"""Training objectives over SID trajectories (plain-PyTorch references; fused kernels are checked against them).

* :mod:`.logpf`: per-step forward log-probabilities under the trie / level / vocab support;
* :mod:`.balance`: trajectory, detailed and sub-trajectory balance;
* :mod:`.preference`: SFT cross-entropy, DPO and S-DPO;
* :mod:`.gfn_loss`: the composed GFlowNet loss from hidden states and its backend dispatcher.
"""
from .balance import (BalanceObjective, DetailedBalance, SubTrajectoryBalance, TrajectoryBalance, log_flows,
                      make_objective, weighted_mean)
from .gfn_loss import (GFNLossOutput, gfn_loss, gfn_loss_reference, register_gfn_loss_backend,
                       registered_gfn_loss_backends, resolve_objective)
from .logpf import SUPPORTS, constrained_log_pf, constrained_log_softmax_rows, level_offsets, trie_walk
from .preference import dpo_loss, sdpo_loss, sft_cross_entropy

__all__ = [
    "BalanceObjective", "TrajectoryBalance", "DetailedBalance", "SubTrajectoryBalance", "make_objective",
    "log_flows", "weighted_mean",
    "constrained_log_pf", "constrained_log_softmax_rows", "trie_walk", "level_offsets", "SUPPORTS",
    "sft_cross_entropy", "dpo_loss", "sdpo_loss",
    "gfn_loss", "gfn_loss_reference", "GFNLossOutput", "register_gfn_loss_backend",
    "registered_gfn_loss_backends", "resolve_objective",
]
