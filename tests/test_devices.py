"""The CPU allocator setting training runs with (gflowgr_core.devices.retain_freed_cpu_memory)."""
import platform
import resource

import pytest
import torch

from gflowgr_core.devices import retain_freed_cpu_memory
from gflowgr_core.train import trainer as trainer_module

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _faults_of_large_tensors(rounds: int = 3, mib: int = 64) -> int:
    """Minor page faults of allocating, filling and freeing a ``mib`` MiB tensor ``rounds`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        x = torch.empty(mib * 2 ** 18).fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="the setting exists only with glibc")
def test_freed_large_blocks_are_reused_without_page_faults():
    assert retain_freed_cpu_memory() is True
    assert retain_freed_cpu_memory() is True  # idempotent
    for _ in range(3):  # the heap grows to the block's size first (and the kernel may settle huge pages)
        _faults_of_large_tensors()
    pages = 3 * 64 * 2 ** 20 // resource.getpagesize()
    # With glibc's default every round maps the 64 MiB afresh: `pages` faults; retained, the heap serves them.
    assert _faults_of_large_tensors() < pages // 20


def test_trainer_applies_the_setting_on_cpu_only_when_configured(beauty_tiny, tmp_path, monkeypatch):
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.train.config import load_config

    data = prepare("letter", beauty_tiny, tmp_path / "data", max_users=20)
    calls = []
    monkeypatch.setattr(trainer_module, "retain_freed_cpu_memory", lambda: calls.append(1) or True)
    base = [f"data={tmp_path / 'data'}", "device=cpu", "stage=sft", "model.hidden=16", "model.layers=1",
            "model.heads=2", "model.kv_heads=2", "model.intermediate=32", "handle_signals=false"]
    trainer_module.Trainer(load_config(None, base + [f"out={tmp_path / 'a'}"]), data)
    assert calls == [1]
    trainer_module.Trainer(load_config(None, base + [f"out={tmp_path / 'b'}", "retain_cpu_memory=false"]), data)
    assert calls == [1]
