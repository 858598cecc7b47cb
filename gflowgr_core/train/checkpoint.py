"""Atomic checkpoint folders for a :class:`~gflowgr_core.model.policy.SIDPolicy` and its run config.

The policy writes itself (:meth:`SIDPolicy.save`); this module adds the run's ``config.yaml`` and writes
into a temporary sibling folder that is renamed into place, so an interrupted save never leaves a
half-written checkpoint where the last good one was.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from gflowgr_core.model.policy import SIDPolicy


def save_policy(policy: SIDPolicy, path: str | Path, config=None) -> Path:
    """Write ``policy`` (and the run ``config``, if given) to the folder ``path`` atomically."""
    from gflowgr_core.train.config import save_config

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    policy.save(tmp)
    if config is not None:
        save_config(config, tmp / "config.yaml")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_policy(path: str | Path, device: Optional[torch.device | str] = None) -> SIDPolicy:
    """Load a policy checkpoint folder, onto ``device`` when given."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(path.name + ".old")
        hint = f" (an interrupted save left {old}: rename it to {path.name})" if old.exists() else ""
        raise FileNotFoundError(f"checkpoint folder {path} does not exist{hint}")
    policy = SIDPolicy.load(path)
    return policy.to(device) if device is not None else policy
