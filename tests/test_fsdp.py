"""FSDP2 training (``distributed: fsdp``): 2 CPU processes (gloo) under ``torchrun`` follow the single-process run at
the same global batch (losses, consolidated weights, evaluation), for SFT and GFlowGR-TB, on tiny Qwen2 and Llama
models with and without LoRA; a sharded checkpoint resumes exactly; misconfigurations stop with a clear error.

The sharded build (only rank 0 builds the policy; every rank's shards are allocated from ``meta`` and filled from it)
is checked on its own: no rank shards a materialised module, every rank keeps only its slice, and the weights equal
the single-process build exactly (from config, with a tied LM head, and from an ``init_checkpoint`` with the flow
heads set up by the stage).

All the 2-process training runs share one ``torchrun`` launch (``tests/fsdp_worker.py``), the build checks another
(``tests/fsdp_build_worker.py``); the single-process references run in this process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gflowgr_core.data.prepared import prepare
from gflowgr_core.evaluation import evaluate_checkpoint
from gflowgr_core.train.checkpoint import (SHARDED_DIR, TRAINER_STATE_FILE, CheckpointError, load_extra,
                                           load_policy, save_policy)
from gflowgr_core.train.config import load_config
from gflowgr_core.train.distributed import DistContext, DistributedError
from gflowgr_core.train.fsdp import decoder_layers, mixed_precision_policy
from gflowgr_core.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_build_worker import TiedTrainer  # noqa: E402
from fsdp_worker import LoraTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
BUILD_WORKER = Path(__file__).resolve().parent / "fsdp_build_worker.py"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# Relative tolerance between the 1-process and 2-process values: the runs differ only in the order of
# floating-point sums (per-rank partial means, gradient reduce-scatter, sharded gradient-norm).
RTOL = 1e-5
# AdamW divides by sqrt(v): a weight whose gradients are tiny moves by up to lr per step whatever their size, so
# last-bit differences in them show up in the weights at ~1e-5 after a few steps at lr 3e-3 (the weights
# move by > 1e-3, checked below).
ATOL_WEIGHTS = 1e-4

# 15 examples in global batches of 7: 7, 7, 1 rows per step (the last step leaves rank 0 without rows), 2 epochs;
# validation only after the last epoch, so best/ holds the final weights.
RUN = ["device=cpu", "model.hidden=32", "model.layers=2", "model.heads=2", "model.kv_heads=2",
       "model.intermediate=64", "model.flow_hidden=32", "batch_size=7", "max_train_examples=15", "epochs=2",
       "eval_every=2", "warmup_steps=2", "lr=3e-3", "log_every=1", "valid_max_users=9", "eval_beams=4",
       "eval_batch_size=64", "save_every_steps=0", "handle_signals=false"]
TB = ["stage=gflowgr", "gfn.objective=tb", "gfn.sampler=random", "gfn.n_aug=2"]

# name -> (architecture, stage overrides, LoRA)
SCENARIOS = {
    "sft_qwen2": ("qwen2", ["stage=sft"], False),
    "tb_qwen2": ("qwen2", TB, False),
    "sft_llama_lora": ("llama", ["stage=sft_continue"], True),
    "tb_llama_lora": ("llama", TB, True),
    # The on-policy sampler decodes with beam search during training: on the consolidated copy under FSDP.
    "tb_qwen2_onpolicy": ("qwen2", [*TB, "gfn.sampler=onpolicy"], False),
}
RESUMED = "tb_llama_lora"   # also run stopped after step 2 and resumed from its sharded last/


def _args(root: Path, data: Path, name: str, out: str) -> list[str]:
    arch, stage, _ = SCENARIOS[name]
    return [f"data={data}", f"out={root / out}", f"init_checkpoint={root / ('init_' + arch)}", f"model.arch={arch}",
            *stage, *RUN]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, beauty_tiny):
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "data"
    prepared = prepare("letter", beauty_tiny, data, max_users=16)
    for arch in ("qwen2", "llama"):
        init = Trainer(load_config(None, [f"data={data}", f"out={root / ('build_' + arch)}", "stage=sft",
                                          f"model.arch={arch}", *RUN]), prepared)
        save_policy(init.policy, root / f"init_{arch}")
    spec = [{"args": [*_args(root, data, name, name), "distributed=fsdp"], "lora": SCENARIOS[name][2]}
            for name in SCENARIOS]
    spec.append({"args": [*_args(root, data, RESUMED, "resumed"), "distributed=fsdp"], "lora": True, "stop_at": 2,
                 "resume": True})
    # Residual dropout is added after the build, on every rank (its hooks cannot travel in the meta skeleton).
    spec.append({"args": [*_args(root, data, "sft_qwen2", "dropout"), "model.hidden_dropout=0.2", "distributed=fsdp"],
                 "lora": False})
    spec.append({"args": [*_args(root, data, "sft_qwen2", "no_layer_class"), "distributed=fsdp"],
                 "no_layer_class": True, "expect_error": "no decoder layer"})
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(root / "spec.json")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    first = proc.stderr.find("Traceback")  # a failing rank's own traceback, before torchrun's summary
    assert proc.returncode == 0, proc.stderr[first:first + 6000] if first >= 0 else proc.stderr[-6000:]
    # The single-process references at the same global batch.
    for name, (_, _, lora) in SCENARIOS.items():
        cls = LoraTrainer if lora else Trainer
        cls(load_config(None, _args(root, data, name, name + "_one")), prepared).fit()
    return root, data


def _log(out: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # Only the last epoch validates (eval_every=2): its record carries "valid".
    return [r for r in records if "loss" in r], [r["eval"]["valid"] for r in records if "valid" in r.get("eval", {})]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_policy(folder, recover=False).state_dict()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(runs, name):
    root, _ = runs
    fsdp_steps, fsdp_evals = _log(root / name)
    one_steps, one_evals = _log(root / f"{name}_one")
    assert [r["step"] for r in fsdp_steps] == [r["step"] for r in one_steps] == list(range(1, 7))
    for a, b in zip(fsdp_steps, one_steps):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=RTOL, abs_tol=1e-7), (name, a["step"], key, a[key], value)
    if name.startswith("tb"):
        assert all(r["gfn"] > 0 for r in fsdp_steps)  # the balance loss really ran
    # The consolidated export (best/ = the final weights: one validation, after the last epoch).
    wa, wb = _weights(root / name / "best"), _weights(root / f"{name}_one" / "best")
    assert wa.keys() == wb.keys()
    start = _weights(root / f"init_{SCENARIOS[name][0]}")
    moved = max(float((wb[k] - start[k]).abs().max()) for k in wb if k in start)
    assert moved > 1e-3  # training changed the weights, so equality below means something
    for k in wb:
        assert torch.allclose(wa[k], wb[k], rtol=RTOL, atol=ATOL_WEIGHTS), (name, k, float((wa[k] - wb[k]).abs().max()))
    # Evaluation during the run and of the consolidated model afterwards.
    assert len(fsdp_evals) == 1 and fsdp_evals == one_evals
    fsdp_result = json.loads((root / name / "result.json").read_text())
    one_result = json.loads((root / f"{name}_one" / "result.json").read_text())
    assert fsdp_result["world_size"] == 2 and fsdp_result["test"] == one_result["test"]


def test_hidden_dropout_runs_sharded_and_changes_the_losses(runs):
    root, _ = runs
    dropped, _ = _log(root / "dropout")
    plain, _ = _log(root / "sft_qwen2")
    assert [r["step"] for r in dropped] == list(range(1, 7))
    assert json.loads((root / "dropout" / "result.json").read_text())["world_size"] == 2
    # Same weights and batch at step 1: only the dropout masks differ.
    assert dropped[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-6)


def test_consolidated_export_loads_for_eval_and_generate(runs):
    from transformers import AutoModelForCausalLM

    root, data = runs
    name = "tb_llama_lora"
    # `gflowgr eval --checkpoint best/` on the FSDP run gives the single-process run's metrics.
    fsdp = evaluate_checkpoint(str(root / name / "best"), split="test", beams=4, device="cpu")
    one = evaluate_checkpoint(str(root / f"{name}_one" / "best"), split="test", beams=4, device="cpu")
    assert fsdp == one
    # best/lm is a plain HF folder (adapters merged): model.generate runs on it.
    prompt = torch.tensor([[1, 5, 40, 3]])
    outs = []
    for folder in (root / name / "best" / "lm", root / f"{name}_one" / "best" / "lm"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert not any("lora" in k for k in model.state_dict())
        outs.append(model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert outs[0].shape == (1, 8) and torch.equal(outs[0], outs[1])


def test_sharded_checkpoint_layout_and_exact_resume(runs):
    root, _ = runs
    last = root / RESUMED / "last"
    # Each rank wrote its own shards; the trainer state beside them holds no model or optimiser tensors.
    files = sorted(p.name for p in (last / SHARDED_DIR).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = load_extra(last, TRAINER_STATE_FILE)
    assert state["optimizer"] is None and state["world_size"] == 2 and len(state["rng"]) == 2
    assert json.loads((last / "checkpoint.json").read_text())["sharded"] is True
    with pytest.raises(CheckpointError, match="sharded training checkpoint"):
        load_policy(last)
    # Stopped after step 2, resumed from the sharded last/: the same steps, losses and final weights, exactly.
    full_steps, full_evals = _log(root / RESUMED)
    resumed_steps, resumed_evals = _log(root / "resumed")
    assert [(r["step"], r["loss"]) for r in resumed_steps] == [(r["step"], r["loss"]) for r in full_steps]
    assert len(resumed_evals) == 1 and resumed_evals == full_evals
    wa, wb = _weights(root / "resumed" / "best"), _weights(root / RESUMED / "best")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_sharded_checkpoint_refuses_a_single_process_resume(runs, tmp_path):
    root, data = runs
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(root / RESUMED, out)
    args = [a for a in _args(root, data, RESUMED, "x") if not a.startswith("out=")]
    with pytest.raises(CheckpointError, match="sharded training checkpoint"):
        LoraTrainer(load_config(None, [*args, f"out={out}", "resume=true"])).fit()


def test_no_decoder_layer_class_stops_with_what_to_change(runs):
    root, _ = runs
    messages = [(root / "no_layer_class" / f"error{r}.txt").read_text() for r in (0, 1)]
    assert all(m.startswith("DistributedError") and "_no_split_modules" in m for m in messages)


def test_decoder_layers_found_or_explained():
    from gflowgr_core.model.policy import build_tiny_causal_lm

    for arch, cls in (("qwen2", "Qwen2DecoderLayer"), ("llama", "LlamaDecoderLayer")):
        model = build_tiny_causal_lm(20, hidden=16, layers=3, heads=2, arch=arch)
        assert [type(m).__name__ for m in decoder_layers(model)] == [cls] * 3
        model._no_split_modules = ["NotALayer"]
        with pytest.raises(DistributedError, match="NotALayer.*none of them is a submodule"):
            decoder_layers(model)


def test_fsdp_without_torchrun_says_how_to_launch(monkeypatch, tmp_path):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedError, match="torchrun --nproc_per_node=N"):
        DistContext.from_env("cpu", "fsdp")
    with pytest.raises(ValueError, match="is not one of"):
        load_config(None, ["distributed=zero3"])


def test_mixed_precision_only_on_cuda_bf16():
    assert mixed_precision_policy(torch.device("cpu"), "bfloat16") is None
    assert mixed_precision_policy(torch.device("cuda", 0), "float32") is None
    mp = mixed_precision_policy(torch.device("cuda", 0), "bfloat16")
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32


def test_hf_trainer_refuses_the_library_fsdp_override(tmp_path):
    from gflowgr_core.hf_trainer import GFlowGRConfig, GFlowGRTrainer
    from gflowgr_core.train.config import ConfigError

    args = GFlowGRConfig(output_dir=str(tmp_path), data_dir=str(tmp_path / "data"), stage="sft", use_cpu=True,
                         report_to="none", gflowgr_overrides=["distributed=fsdp"])
    with pytest.raises(ConfigError, match="cli train .* distributed=fsdp"):
        GFlowGRTrainer(args)


# name -> (overrides beyond RUN, tied LM head)
BUILDS = {
    "sft_qwen2_config": (["stage=sft", "model.arch=qwen2"], False),
    "sft_llama_tied": (["stage=sft", "model.arch=llama"], True),
    "tb_qwen2_checkpoint": ([*TB, "model.arch=qwen2"], False),   # from init_checkpoint; log Z set from the data
}


def _torchrun(worker: Path, spec: Path, cwd: Path, nproc: int = 2) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(worker),
           str(spec)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    first = proc.stderr.find("Traceback")
    assert proc.returncode == 0, proc.stderr[first:first + 6000] if first >= 0 else proc.stderr[-6000:]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, beauty_tiny):
    root = tmp_path_factory.mktemp("fsdp_build")
    data = root / "data"
    prepared = prepare("letter", beauty_tiny, data, max_users=16)
    init = Trainer(load_config(None, [f"data={data}", f"out={root / 'build'}", "stage=sft", "model.arch=qwen2", *RUN]),
                   prepared)
    save_policy(init.policy, root / "init")

    def args(name, out):
        init = [f"init_checkpoint={root / 'init'}"] if name.startswith("tb") else []  # the others from config
        return [f"data={data}", f"out={root / out}", *init, *BUILDS[name][0], *RUN]

    spec = [{"args": [*args(name, name), "distributed=fsdp"], "tied": tied, "result": str(root / name)}
            for name, (_, tied) in BUILDS.items()]
    (root / "spec.json").write_text(json.dumps(spec))
    _torchrun(BUILD_WORKER, root / "spec.json", root)
    references = {}
    for name, (_, tied) in BUILDS.items():
        policy = (TiedTrainer if tied else Trainer)(load_config(None, args(name, name + "_one")), prepared).policy
        references[name] = policy
    return root, references


@pytest.mark.parametrize("name", list(BUILDS))
def test_sharded_build_never_materialises_the_whole_model(builds, name):
    root, references = builds
    ranks = json.loads((root / f"{name}.json").read_text())
    assert len(ranks) == 2
    # Rank 0 built the policy on the CPU; rank 1 received its structure without memory (meta parameters).
    assert ranks[0]["received_cpu"] and not ranks[0]["received_meta"]
    assert ranks[1]["received_meta"]
    # Every module was sharded while its parameters were meta, on both ranks (rank 0's included): sharding never
    # started from a materialised module.
    for seen in ranks:
        assert seen["shard_calls"] == 3 and seen["shard_calls_on_meta"] == 3  # 2 decoder layers + root
        assert seen["plain"] == []  # every parameter is a DTensor
    # Each rank holds its dim-0 slice: the two local shards add up to the parameter, neither holds more than half
    # of its rows (rounded up).
    shards0, shards1 = ranks[0]["shards"], ranks[1]["shards"]
    assert shards0.keys() == shards1.keys()
    reference = dict(references[name].named_parameters())
    assert shards0.keys() == reference.keys()
    for key, (local0, numel) in shards0.items():
        local1 = shards1[key][0]
        rows = reference[key].shape[0]
        per_row = numel // rows
        assert local0 + local1 == numel == reference[key].numel(), key
        assert max(local0, local1) <= math.ceil(rows / 2) * per_row, key


@pytest.mark.parametrize("name", list(BUILDS))
def test_sharded_build_equals_the_single_process_build(builds, name):
    root, references = builds
    ranks = json.loads((root / f"{name}.json").read_text())
    built = torch.load(root / f"{name}.pt", weights_only=True)
    policy = references[name]
    weights = policy.state_dict()
    assert built["weights"].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(built["weights"][key], value), (name, key)
    buffers = dict(policy.named_buffers())
    assert built["buffers"].keys() == buffers.keys()
    for key, value in buffers.items():
        assert torch.equal(built["buffers"][key], value), (name, key)
    # The tie of LM head and input embedding survives sharding and consolidation.
    tied = BUILDS[name][1]
    assert all(seen["tied"] == tied and seen["consolidated_tied"] == tied for seen in ranks)
    if name.startswith("tb"):  # the stage set log Z from the data before sharding: rank 0's value reached every rank
        bias = built["weights"]["log_z_head.net.2.bias"]
        assert float(bias.abs().max()) > 0 and torch.equal(bias, weights["log_z_head.net.2.bias"])


# ------------------------------------------------------------------------------------------- CUDA, bf16
# One GPU (what a GPU check session gets): `torchrun --nproc_per_node=1` with NCCL runs the whole FSDP2 code path
# (fully_shard on a 1-rank mesh, MixedPrecisionPolicy, sharded build, consolidated export) without splitting.
CUDA_RUN = [*(a for a in RUN if not a.startswith("device=")), "device=cuda", "dtype=bfloat16"]
CUDA_STAGES = {"sft": ["stage=sft"], "tb": TB}   # name -> stage overrides (tiny Qwen2 from one init checkpoint)
# FSDP's bf16 (MixedPrecisionPolicy) vs the single-process bf16 (autocast), same fp32 master weights and rows.
# Both run the matmuls in bf16 from the same bf16-rounded weights, but autocast keeps the ops on its fp32 list
# (softmax / log-softmax, norms, losses) and every non-matmul parameter (norm weights, flow heads) in fp32,
# whereas FSDP casts every parameter to bf16 and those ops run on bf16 inputs: per-op relative rounding up to
# 2^-8 ~ 4e-3, which over a few SID levels and a row mean moves the step-1 loss by < 1e-2 relative; the five
# AdamW updates after it (lr <= 3e-3) add a small drift on top, hence 2e-2. A wrong loss (weights not filled
# from rank 0, wrong rows or scaling, a missing balance term) is off by far more than that.
RTOL_BF16 = 2e-2


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA device")
def test_cuda_bf16_fsdp_one_gpu_matches_autocast(tmp_path, beauty_tiny):
    from safetensors.torch import load_file

    data = tmp_path / "data"
    prepared = prepare("letter", beauty_tiny, data, max_users=16)
    init = Trainer(load_config(None, [f"data={data}", f"out={tmp_path / 'build'}", "stage=sft", "model.arch=qwen2",
                                      *RUN]), prepared)
    save_policy(init.policy, tmp_path / "init")

    def args(name: str, out: str) -> list[str]:
        return [f"data={data}", f"out={tmp_path / out}", f"init_checkpoint={tmp_path / 'init'}", "model.arch=qwen2",
                *CUDA_STAGES[name], *CUDA_RUN]

    spec = [{"args": [*args(name, name), "distributed=fsdp"], "probe": str(tmp_path / f"{name}_probe.json")}
            for name in CUDA_STAGES]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _torchrun(WORKER, tmp_path / "spec.json", tmp_path, nproc=1)
    for name in CUDA_STAGES:  # the references: one process, no torchrun, bf16 by autocast
        Trainer(load_config(None, [*args(name, name + "_autocast"), "distributed=auto"]), prepared).fit()

    for name in CUDA_STAGES:
        fsdp_steps, _ = _log(tmp_path / name)
        ref_steps, _ = _log(tmp_path / f"{name}_autocast")
        assert [r["step"] for r in fsdp_steps] == [r["step"] for r in ref_steps] == list(range(1, 7))
        keys = ("loss", "ce", "gfn") if name == "tb" else ("loss", "ce")
        for a, b in zip(fsdp_steps, ref_steps):
            for key in keys:
                assert math.isfinite(a[key]) and math.isfinite(b[key]), (name, a["step"], key, a[key], b[key])
                assert math.isclose(a[key], b[key], rel_tol=RTOL_BF16), (name, a["step"], key, a[key], b[key])
        if name == "tb":
            assert all(r["gfn"] > 0 for r in fsdp_steps)  # the balance loss really ran
        # The policy computed in bf16: every FSDP unit (2 decoder layers + root) carries the bf16 / fp32-reduce
        # policy, the master shards stay fp32, and the weights inside the training forwards were bf16 in a
        # layer unit and in the root unit.
        probe = json.loads((tmp_path / f"{name}_probe.json").read_text())
        assert probe["world_size"] == 1
        assert len(probe["units"]) == 3, probe["units"]
        assert all(u["param_dtype"] == "torch.bfloat16" and u["reduce_dtype"] == "torch.float32"
                   for u in probe["units"]), probe["units"]
        assert probe["master_dtypes"] == ["torch.float32"], probe
        assert probe["compute_dtypes"] == {"layer": ["torch.bfloat16"], "root": ["torch.bfloat16"]}, probe
        # The consolidated export holds the fp32 master weights (read from the files: load_policy would cast).
        best = tmp_path / name / "best"
        lm = {k: v for f in sorted((best / "lm").glob("*.safetensors")) for k, v in load_file(f).items()}
        heads = torch.load(best / "flow_heads.pt", weights_only=True)
        tensors = [*lm.values(), *(v for sd in heads.values() for v in sd.values())]
        assert lm and {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}

