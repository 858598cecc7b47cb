"""Atomic checkpoint folders: a :class:`~gflowgr_core.model.policy.SIDPolicy`, its run config, extra state files.

A save writes everything into the sibling folder ``<name>.tmp``, writes the marker file
:data:`COMPLETE_MARKER` last (after flushing the other files to disk), then swaps folders: ``<name>`` ->
``<name>.old``, ``<name>.tmp`` -> ``<name>``, and removes ``<name>.old``. Whatever instant a process is killed
at, one complete checkpoint survives:

* killed while writing ``.tmp``: ``<name>`` is untouched (the incomplete ``.tmp`` has no marker);
* killed between the two renames: ``<name>`` is missing, the complete ``.tmp`` (newest) or ``.old`` remains.

:func:`recover_checkpoint` repairs these states (it runs before every save and load) and says what it did.

A sharded checkpoint (:func:`save_sharded`, written by FSDP runs) follows the same protocol; its ``.tmp`` folder
holds :data:`SHARDED_DIR`, a ``torch.distributed.checkpoint`` folder to which every rank writes its own shards
(one ``__<rank>_0.distcp`` file each plus ``.metadata``), instead of a policy folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gflowgr_core.model.policy import SIDPolicy

log = logging.getLogger("gflowgr")

COMPLETE_MARKER = "checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.pt"
VALID_RANKS_FILE = "valid_ranks.pt"  # in best/: the best epoch's per-user validation ranks
SHARDED_DIR = "sharded"


@contextlib.contextmanager
def quiet_transformers():
    """Inside the block, transformers shows no progress bars and logs warnings and errors only; both settings
    are restored afterwards.

    A run saves and loads checkpoints many times; each ``save_pretrained``/``from_pretrained`` would draw its own
    "Writing model shards"/"Loading weights" bar (printed in full into a batch job's log, where there is no
    terminal to redraw it) and repeat the same INFO lines. The switch is scoped so that a user's own
    transformers settings hold everywhere else in their process.
    """
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(max(verbosity, hf_logging.WARNING))
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or does not fit the run loading it."""


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder whose save finished (its marker file exists)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so the marker written after it never outlives the data."""
    for file in folder.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_checkpoint(path: str | Path) -> Optional[str]:
    """Repair what an interrupted save left next to checkpoint folder ``path``.

    Returns a sentence describing the repair, or ``None`` when there was nothing to do. The newest complete
    folder wins: a complete ``.tmp`` (the save got as far as its marker) replaces ``path``; otherwise a
    missing ``path`` is restored from ``.old``; incomplete ``.tmp`` folders and ``.old`` folders next to a
    good ``path`` are removed.
    """
    path = Path(path)
    tmp, old = _siblings(path)
    actions = []
    if tmp.exists() and is_complete(tmp):
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        actions.append(f"promoted the complete {tmp.name} written by an interrupted save to {path.name}")
    elif tmp.exists():
        shutil.rmtree(tmp)
        actions.append(f"removed the incomplete {tmp.name} of an interrupted save")
    if not path.exists() and old.exists():
        old.rename(path)
        actions.append(f"restored {path.name} from {old.name} (a save was interrupted between its renames)")
    elif old.exists():
        shutil.rmtree(old)
        actions.append(f"removed the leftover {old.name}")
    if not actions:
        return None
    _fsync_dir(path.parent)
    message = f"checkpoint {path}: " + "; ".join(actions)
    log.warning(message)
    return message


def save_policy(policy: SIDPolicy, path: str | Path, config=None, extra: Optional[dict[str, Any]] = None,
                info: Optional[dict] = None) -> Path:
    """Write ``policy`` (and the run ``config``, if given) to the folder ``path`` atomically.

    Args:
        policy: the policy to save (:meth:`SIDPolicy.save` layout).
        path: the checkpoint folder; replaced only once the new one is complete.
        config: a ``TrainConfig`` written as ``config.yaml``.
        extra: ``{file_name: object}`` written with :func:`torch.save` inside the folder (e.g. the trainer
            state of a resumable checkpoint); objects must load with ``weights_only=True``.
        info: JSON-serialisable details stored in the marker file (e.g. the step).
    """
    from gflowgr_core.train.config import save_config

    path = Path(path)
    tmp, old = _siblings(path)
    recover_checkpoint(path)  # never delete the only good copy a previous crash left as .old
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
        policy.save(tmp)
    if config is not None:
        save_config(config, tmp / "config.yaml")
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    _fsync_tree(tmp)
    marker = {"format_version": 1, "saved_at": time.time(), **(info or {})}
    (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    _fsync_tree(tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_policy(path: str | Path, device: Optional[torch.device | str] = None, recover: bool = True
                ) -> SIDPolicy:
    """Load a policy checkpoint folder, onto ``device`` when given.

    With ``recover`` (the default) leftovers of an interrupted save are repaired first
    (:func:`recover_checkpoint`); pass ``False`` when another process may be doing that at the same time.
    """
    path = Path(path)
    if recover:
        recover_checkpoint(path)
    if not path.exists():
        tmp, old = _siblings(path)
        hint = ""
        if old.exists() or tmp.exists():
            hint = f" ({old.name if old.exists() else tmp.name} is left from an interrupted save)"
        raise FileNotFoundError(f"checkpoint folder {path} does not exist{hint}")
    if is_sharded(path):
        raise CheckpointError(f"{path} is a sharded training checkpoint (FSDP, {SHARDED_DIR}/): it resumes a run "
                              f"launched with torchrun and distributed: fsdp (resume=true), but holds no policy "
                              f"folder; the same run's best/ folder is the consolidated model to load")
    with quiet_transformers():
        policy = SIDPolicy.load(path)
    return policy.to(device) if device is not None else policy


def is_sharded(path: str | Path) -> bool:
    """Whether checkpoint folder ``path`` was written by :func:`save_sharded`."""
    return (Path(path) / SHARDED_DIR).is_dir()


def save_sharded(path: str | Path, state: dict, dist, config=None, extra: Optional[dict[str, Any]] = None,
                 info: Optional[dict] = None) -> Path:
    """Write a sharded checkpoint folder atomically; every rank of ``dist`` must call it.

    Args:
        path: the checkpoint folder (on a file system every rank sees); replaced only once the new one is complete.
        state: this rank's ``{name: state dict of DTensors}`` (e.g. FSDP model and optimiser state from
            ``torch.distributed.checkpoint.state_dict.get_state_dict``), saved with
            ``torch.distributed.checkpoint.save`` into ``path/sharded``: each rank writes only its shards.
        dist: the run's :class:`~gflowgr_core.train.distributed.DistContext`.
        config, extra, info: as in :func:`save_policy`, written by rank 0 (``extra`` objects must load with
            ``weights_only=True``, so they hold no DTensor).
    """
    import torch.distributed.checkpoint as dcp

    from gflowgr_core.train.config import save_config

    path = Path(path)
    tmp, old = _siblings(path)
    if dist.is_main:
        recover_checkpoint(path)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDED_DIR).mkdir(parents=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp / SHARDED_DIR))
    dist.barrier()  # every rank's shards are written before the marker
    if dist.is_main:
        if config is not None:
            save_config(config, tmp / "config.yaml")
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        _fsync_tree(tmp)
        marker = {"format_version": 1, "saved_at": time.time(), "sharded": True, "world_size": dist.world_size,
                  **(info or {})}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_tree(tmp)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()
    return path


def load_sharded(path: str | Path, state: dict) -> None:
    """Read :func:`save_sharded`'s shards into ``state`` in place (every rank, with templates of the same keys,
    e.g. from ``get_state_dict``); the world size may differ from the saving run's."""
    import torch.distributed.checkpoint as dcp

    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER})")
    if not is_sharded(path):
        raise CheckpointError(f"{path} holds no {SHARDED_DIR}/ folder: it was not written by an FSDP run (a run "
                              f"with distributed: auto/off resumes from it)")
    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))


def sharded_keys(path: str | Path) -> set[str]:
    """The flattened keys (``"model.policy.model.lm_head.weight"``, ``"optimizer.state.<param>.exp_avg"``, ...)
    that the sharded checkpoint ``path`` holds, read from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    if not is_sharded(path):
        raise CheckpointError(f"{path} holds no {SHARDED_DIR}/ folder: it was not written by an FSDP run")
    return set(FileSystemReader(str(Path(path) / SHARDED_DIR)).read_metadata().state_dict_metadata)


def load_extra(path: str | Path, name: str, map_location: Any = "cpu") -> Any:
    """Read the ``extra`` object ``name`` that :func:`save_policy` wrote into checkpoint ``path``."""
    file = Path(path) / name
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}): its save was "
                              f"interrupted; an older copy may be at {Path(path).name}.old")
    if not file.is_file():
        raise CheckpointError(f"{file} not found: {path} was not written with {name!r}")
    return torch.load(file, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng(generator: Optional[torch.Generator] = None) -> dict:
    """Every random state a training step can touch: Python, NumPy, torch CPU (and CUDA), ``generator``.

    The result holds only lists, ints, floats, strings and tensors, so it loads with ``weights_only=True``.
    """
    py = random.getstate()
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss),
                  float(np_cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state() if generator is not None else None,
        "generator_device": str(generator.device) if generator is not None else None,
    }
    return state


def restore_rng(state: dict, generator: Optional[torch.Generator] = None) -> None:
    """Restore what :func:`capture_rng` captured (into ``generator`` for the trainer's own stream)."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this node has %d: CUDA RNG not restored",
                        len(state["cuda"]), torch.cuda.device_count())
    if generator is not None:
        if state.get("generator") is None:
            raise CheckpointError("checkpoint RNG state has no trainer generator state")
        generator.set_state(state["generator"])
