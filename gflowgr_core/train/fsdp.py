"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the library trainer.

``distributed: fsdp`` under ``torchrun`` shards the parameters, gradients and optimiser state over the ranks
instead of replicating them (DDP). :class:`ShardedTraining` applies ``fully_shard`` to

* every decoder layer of the LM (the classes its ``_no_split_modules`` names: ``Qwen2DecoderLayer``,
  ``LlamaDecoderLayer``, ...), each its own unit, all-gathered just before its forward and freed after it;
* the root: the loss module around the policy (the trainer's ``_StageLoss``), whose unit holds everything
  else: embeddings, final norm, LM head, the ``log Z`` / ``log F`` flow heads and the reward's parameters.

The root's forward computes the *whole* stage loss (packed forward, SID-row log-probs, balance loss). FSDP
all-gathers the root unit when that forward starts and keeps it gathered until backward, so the fused loss reads
the LM head's SID rows (``SIDPolicy.sid_head_weight``) as a plain tensor slice of the gathered head, within
FSDP's own schedule: no vocabulary-sized logits, no extra gather of the head, and the gradient of the rows flows
into FSDP's reduce-scatter like any other parameter's.

Work that needs whole weights outside that forward (beam-search evaluation, on-policy sampling, the consolidated
export written to ``best/``) runs on :meth:`ShardedTraining.consolidated`: a plain copy of the policy, filled by
gathering each parameter once (a collective every rank enters) and emptied again afterwards. Decoding on it
makes no collective calls, so ranks may decode different numbers of batches.

Mixed precision: on CUDA with ``dtype: bfloat16`` the units compute in bf16 and reduce gradients in fp32
(``MixedPrecisionPolicy``), the sharded master weights and AdamW state stay fp32; on the CPU (and with
``dtype: float32``) everything is fp32, which is what makes a 2-process CPU run equal a 1-process run.

Checkpoints (:meth:`ShardedTraining.sharded_state` / :meth:`ShardedTraining.load_sharded_state`) are model and
optimiser state dicts of DTensors for ``torch.distributed.checkpoint``: every rank writes its own shards.

Building sharded (:func:`build_on_rank0` + ``ShardedTraining(..., from_rank0=True)``): only rank 0 builds the policy
(from config, ``model.pretrained`` or ``init_checkpoint``, exactly as one process does, on the CPU); the other ranks
receive its structure with ``meta`` parameters (no memory). Sharding then turns every rank's parameters into
``meta`` DTensors, allocates each rank's shards (``to_empty``) and fills them from rank 0 one parameter at a time
(a broadcast, of which each rank keeps its slice). No rank other than 0 ever holds a whole parameter set, none
holds the whole model on the training device, and the weights are the single-process build's bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from gflowgr_core.model.policy import SIDPolicy
from gflowgr_core.train.checkpoint import load_sharded, sharded_keys
from gflowgr_core.train.distributed import DistContext, DistributedError

log = logging.getLogger("gflowgr")

__all__ = ["PolicyConsolidator", "ShardedTraining", "build_on_rank0", "decoder_layers",
           "drop_unsaved_optimizer_state", "mixed_precision_policy"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of HF causal LM ``model`` that FSDP wraps one by one.

    They are the modules whose class the model lists in ``_no_split_modules`` (every HF decoder does, e.g.
    ``["Qwen2DecoderLayer"]``); a PEFT-wrapped model keeps its classes, so LoRA changes nothing here.

    Raises:
        DistributedError: no such module, with what to change.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(
            f"distributed: fsdp found no decoder layer to shard in {type(model).__name__}: FSDP wraps the modules "
            f"whose class the model lists in `_no_split_modules`, and it lists {sorted(names) or 'none'}"
            f"{'' if not names else ' but none of them is a submodule'}. Set "
            f"`{type(model).__name__}._no_split_modules = ['<YourDecoderLayerClass>']` before training, or use "
            f"distributed: auto (DDP) for this model")
    return layers


def mixed_precision_policy(device: torch.device, dtype: str):
    """FSDP2's ``MixedPrecisionPolicy`` for a run: bf16 compute with fp32 gradient reduction on CUDA when
    ``dtype == "bfloat16"``; ``None`` (fp32 throughout) otherwise, the CPU included (bf16 on the CPU buys little
    and would break the parity with one process)."""
    if device.type == "cuda" and dtype == "bfloat16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def drop_unsaved_optimizer_state(optim_state: dict, saved_keys: set[str], prefix: str = "optimizer") -> None:
    """Remove from the optimiser state dict template ``optim_state`` (``get_optimizer_state_dict``'s, to be
    filled by ``torch.distributed.checkpoint.load``) the parameters that have no state in the checkpoint.

    Building the template gives every parameter AdamW state (torch runs a zero-lr step on a fresh optimiser); a
    parameter that never had a gradient (e.g. log F under TB, the flow heads under SFT) has none in the checkpoint
    and must have none after loading either, or its first real update would differ from the saving run's. Load
    the pruned template with ``set_optimizer_state_dict(..., options=StateDictOptions(strict=False))``.

    Args:
        optim_state: the template, changed in place.
        saved_keys: the checkpoint's flattened keys (its metadata's ``state_dict_metadata``).
        prefix: the key under which the optimiser state was saved.
    """
    head = f"{prefix}.state."
    saved = {k[len(head):].rsplit(".", 1)[0] for k in saved_keys if k.startswith(head)}
    state = optim_state.get("state", {})
    for fqn in list(state):
        if fqn not in saved:
            del state[fqn]


def _meta_skeleton(policy: SIDPolicy) -> SIDPolicy:
    """A copy of ``policy`` whose parameters are meta tensors (no memory); buffers, tokenizer, PEFT wrappers and
    tied weights are copied as they are. :meth:`ShardedTraining.consolidated` fills it with the gathered
    weights."""
    memo: dict = {}
    for p in policy.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(policy, memo)


def _owners(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(parameter) -> [(module, attribute name), ...]`` over every module (tied weights have several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name))
    return owners


def build_on_rank0(build: Callable[[], tuple[SIDPolicy, Any]], dist: DistContext) -> tuple[SIDPolicy, Any]:
    """Run ``build`` on rank 0 only and give every other rank the policy's structure with ``meta`` parameters.

    ``build()`` returns ``(policy, extra)``: the whole policy on the CPU, built as one process builds it, and any
    picklable value every rank needs from the build (the trainer passes its configuration, which loading an
    ``init_checkpoint`` rewrites). Rank 0 keeps its real policy: it is the source of the weights that
    ``ShardedTraining(..., from_rank0=True)`` spreads over the ranks. The other ranks get a copy whose parameters
    are ``meta`` tensors (shapes, dtypes and weight ties, no memory) and whose buffers (SID tables, rotary
    frequencies) are rank 0's; their policy must not be run before it is sharded.

    Returns:
        ``(policy, extra)`` on every rank.
    """
    if not dist.enabled:
        raise DistributedError("build_on_rank0 needs a process group (launch with torchrun)")
    payload = None
    if dist.is_main:
        policy, extra = build()
        payload = (_meta_skeleton(policy), extra)
    received = dist.broadcast_object(payload)
    if dist.is_main:
        return policy, extra
    return received


def _meta_parameters(module: nn.Module) -> None:
    """Replace every parameter of ``module`` by a ``meta`` one of the same shape, dtype and ``requires_grad``, in
    place, keeping weight ties (a parameter shared by several modules stays one parameter); buffers are left."""
    for slots in _owners(module).values():
        mod, attr = slots[0]
        p = mod._parameters[attr]
        new = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for mod, attr in slots:
            mod._parameters[attr] = new


def _local_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dim-0 slice of ``full`` as FSDP2 shards it (``torch.chunk``; trailing ranks may get none)."""
    chunks = torch.chunk(full, world_size, dim=0)
    if rank < len(chunks):
        return chunks[rank]
    return full.new_empty((0, *full.shape[1:]))


class PolicyConsolidator:
    """Whole weights of a policy that FSDP2 shards, for the work that needs them outside the sharded forward.

    Build it *before* the policy is sharded (it copies the module structure, with meta parameters, while every
    parameter still has its full shape); :meth:`consolidated` then gathers the current weights into that copy.
    :class:`ShardedTraining` (the library trainer) is one; ``GFlowGRTrainer`` builds one for the policy that
    accelerate's FSDP2 plugin shards.

    Args:
        policy: the :class:`SIDPolicy` (plain or with PEFT LoRA adapters) that is about to be sharded.
    """

    def __init__(self, policy: SIDPolicy):
        self.policy = policy
        self._skeleton = _meta_skeleton(policy)

    # ------------------------------------------------------------------------------------ whole weights
    @contextlib.contextmanager
    def consolidated(self) -> Iterator[SIDPolicy]:
        """A plain :class:`SIDPolicy` holding the full current weights (fp32 master values) for the block.

        Every rank must enter (each parameter is gathered with one all-gather, in the same order everywhere);
        inside, the copy is an ordinary module: decode, evaluate or ``save`` it without collectives. Its
        weights are released on exit. Costs one full copy of the model per rank while open.
        """
        from torch.distributed.tensor import DTensor

        skeleton = self._skeleton
        owners = _owners(skeleton)
        meta = dict(skeleton.named_parameters())
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        try:
            with torch.no_grad():
                for name, p in self.policy.named_parameters():
                    if name not in meta:
                        raise RuntimeError(f"FSDP consolidation: parameter {name} is not in the policy's copy "
                                           f"(was the policy changed after sharding?)")
                    full = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
                    target = meta[name]
                    if tuple(full.shape) != tuple(target.shape):
                        raise RuntimeError(f"FSDP consolidation: {name} gathers to {tuple(full.shape)}, expected "
                                           f"{tuple(target.shape)}")
                    new = nn.Parameter(full, requires_grad=target.requires_grad)
                    for mod, attr in owners[id(target)]:
                        swapped.append((mod, attr, target))
                        mod._parameters[attr] = new
                # Buffers are replicated by FSDP; copy their current values (none change in training today).
                buffers = dict(skeleton.named_buffers())
                for name, b in self.policy.named_buffers():
                    if name in buffers and buffers[name].shape == b.shape:
                        buffers[name].copy_(b)
            skeleton.train(self.policy.training)
            yield skeleton
        finally:
            for mod, attr, original in reversed(swapped):
                mod._parameters[attr] = original


class ShardedTraining(PolicyConsolidator):
    """A policy and its loss module sharded with FSDP2 over the ranks of ``dist``.

    Args:
        root: the module whose forward computes the whole training loss and that holds ``policy`` (and the
            reward) as submodules; it becomes the FSDP root.
        policy: the :class:`SIDPolicy` inside ``root`` (plain or with PEFT LoRA adapters), on ``dist.device``.
        dist: a distributed context with a process group (``torchrun``; one rank is allowed).
        dtype: the run's ``TrainConfig.dtype`` (see :func:`mixed_precision_policy`).
        from_rank0: the policy came from :func:`build_on_rank0`: rank 0's ``root`` holds the weights, the other
            ranks' policy has ``meta`` parameters. Every rank's parameters are then sharded as ``meta`` tensors,
            allocated shard by shard on ``dist.device`` and filled from rank 0 (:meth:`_fill_from_rank0`), so no
            rank allocates the whole model on ``dist.device``. Otherwise every rank holds the same whole ``root``
            on ``dist.device`` and shards it where it is.

    Build it before the optimiser: ``fully_shard`` replaces every parameter with a sharded one.
    """

    def __init__(self, root: nn.Module, policy: SIDPolicy, dist: DistContext, dtype: str = "float32",
                 from_rank0: bool = False):
        if not dist.enabled:
            raise DistributedError("FSDP needs a process group (launch with torchrun)")
        if not any(m is policy for m in root.modules()):
            raise ValueError("the FSDP root module must contain the policy")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.root, self.dist = root, dist
        layers = decoder_layers(policy.model)
        self.layer_class = type(layers[0]).__name__
        buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        if from_rank0:
            # The policy was built on the CPU (rank 0) or received (the others): its buffers (SID tables, rotary
            # frequencies) go to the device now, before the consolidation copy below takes them.
            buffers = [(mod, name, b.to(dist.device)) for mod in root.modules() for name, b in mod._buffers.items()
                       if b is not None]
            for mod, name, b in buffers:
                mod._buffers[name] = b
        # The consolidation copy is taken before sharding, while the parameters still have their full shapes.
        super().__init__(policy)
        self.mp_policy = mixed_precision_policy(dist.device, dtype)
        self.mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        kwargs = {"mesh": self.mesh}
        if self.mp_policy is not None:
            kwargs["mp_policy"] = self.mp_policy
        source: dict[str, torch.Tensor] = {}
        if from_rank0:
            # Rank 0 keeps its whole parameters (on the CPU) as the source of the broadcast below; its module gets
            # meta parameters like the other ranks', so that sharding allocates nothing yet. Buffers are real on
            # every rank; `to_empty` would wipe them, so they are put back afterwards.
            if dist.is_main:
                source = {name: p.detach() for name, p in root.named_parameters()}
            _meta_parameters(root)
        for layer in reversed(layers):  # inner units before the units around them, should the classes nest
            fully_shard(layer, **kwargs)
        fully_shard(root, **kwargs)
        if from_rank0:
            root.to_empty(device=dist.device)  # allocates this rank's shards only (uninitialised)
            for mod, name, b in buffers:
                mod._buffers[name] = b
            self._fill_from_rank0(root, source)
        # FSDP picks as root the first unit whose forward runs. Decoding (on-policy sampling, evaluation) never
        # runs the sharded modules, but initialise the root now so that nothing else can ever claim that role.
        state = root._get_fsdp_state()  # no public API does this in torch 2.13
        state._lazy_init()
        n_params = sum(p.numel() for p in policy.parameters())
        log.info("FSDP2: %d %s units + root over %d ranks (%s), %.1fM parameters, %s", len(layers), self.layer_class,
                 dist.world_size, dist.backend, n_params / 1e6,
                 "bf16 compute / fp32 reduce" if self.mp_policy is not None else "fp32")
        self.num_units = len(layers) + 1

    def _fill_from_rank0(self, root: nn.Module, source: dict[str, torch.Tensor]) -> None:
        """Fill every rank's parameter shards of the sharded ``root`` with rank 0's whole weights ``source``
        (empty on the other ranks), one parameter at a time: rank 0 broadcasts it, every rank copies its dim-0
        slice into its shard. The largest transient allocation on a rank is one whole parameter, and rank 0
        releases each source tensor once it is sent."""
        import torch.distributed as torch_dist
        from torch.distributed.tensor import DTensor

        dist = self.dist
        with torch.no_grad():
            for name, p in root.named_parameters():
                if not isinstance(p, DTensor):
                    raise RuntimeError(f"FSDP build: parameter {name} is not sharded (is it outside the FSDP root?)")
                if dist.is_main:
                    if name not in source:
                        raise RuntimeError(f"FSDP build: parameter {name} of the sharded module is not a parameter "
                                           f"of the built one (a weight tie was lost?)")
                    full = source.pop(name).to(dist.device)
                else:
                    full = torch.empty(p.shape, dtype=p.dtype, device=dist.device)
                if tuple(full.shape) != tuple(p.shape):
                    raise RuntimeError(f"FSDP build: {name} is {tuple(full.shape)} on rank 0, the sharded parameter "
                                       f"{tuple(p.shape)}")
                torch_dist.broadcast(full, src=0)
                local = p.to_local()
                rows = _local_rows(full, dist.rank, dist.world_size)
                if rows.shape != local.shape:
                    raise RuntimeError(f"FSDP build: {name}: rank {dist.rank} holds a {tuple(local.shape)} shard, "
                                       f"expected the rows {tuple(rows.shape)} of {tuple(full.shape)}")
                local.copy_(rows)
                del full, rows
        if source:
            raise RuntimeError(f"FSDP build: parameters of the built module missing from the sharded one: "
                               f"{sorted(source)[:5]}")

    # ---------------------------------------------------------------------------------------- checkpoints
    def sharded_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``{"model": ..., "optimizer": ...}``: this rank's shards (DTensors) keyed by parameter name, for
        ``torch.distributed.checkpoint.save``. The model part covers the root: policy and reward."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.root, optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_sharded_state(self, optimizer: torch.optim.Optimizer, path) -> None:
        """Fill the model and ``optimizer`` from the sharded checkpoint folder ``path``
        (:func:`~gflowgr_core.train.checkpoint.save_sharded`); every rank reads its own shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = self.sharded_state(optimizer)
        drop_unsaved_optimizer_state(state["optimizer"], sharded_keys(path))
        load_sharded(path, state)
        set_model_state_dict(self.root, state["model"])  # strict: every parameter and buffer
        # Not strict only so that the parameters pruned above are allowed to have no state.
        set_optimizer_state_dict(self.root, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
