"""Training objectives over SID trajectories (plain-PyTorch references; fused kernels are checked against them).

* :mod:`.logpf`: constrained log P_F, the per-step forward log-probabilities under the trie / level / vocab
  support: the op :func:`constrained_log_pf` (fused kernels when they apply) and its reference
  :func:`constrained_log_pf_torch`;
* :mod:`.balance`: trajectory, detailed and sub-trajectory balance;
* :mod:`.preference`: SFT cross-entropy, DPO and S-DPO;
* :mod:`.gfn_loss`: the composed GFlowNet loss from hidden states and its dispatcher.
"""
from .balance import (BalanceObjective, DetailedBalance, SubTrajectoryBalance, TrajectoryBalance, log_flows,
                      make_objective, weighted_mean)
from .gfn_loss import GFNLossOutput, gfn_loss, gfn_loss_reference, resolve_objective
from .logpf import (SUPPORTS, autocast_operands, code_offsets, constrained_log_pf, constrained_log_pf_torch,
                    constrained_log_softmax_rows, trie_walk)
from .preference import dpo_loss, sdpo_loss, sft_cross_entropy

__all__ = [
    "BalanceObjective", "TrajectoryBalance", "DetailedBalance", "SubTrajectoryBalance", "make_objective",
    "log_flows", "weighted_mean",
    "constrained_log_pf", "constrained_log_pf_torch", "constrained_log_softmax_rows", "trie_walk",
    "code_offsets", "autocast_operands", "SUPPORTS",
    "sft_cross_entropy", "dpo_loss", "sdpo_loss",
    "gfn_loss", "gfn_loss_reference", "GFNLossOutput", "resolve_objective",
]
