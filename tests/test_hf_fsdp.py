"""GFlowGRTrainer under accelerate's FSDP2 plugin: 2 CPU processes (gloo) started by ``accelerate launch
--config_file examples/accelerate_fsdp2.yaml`` follow the single-process run at the same global batch (losses,
gradient norms, consolidated weights, evaluation) for SFT, GFlowGR-TB and SFT with LoRA on a tiny Qwen2, and for
SFT on a tiny Llama (its own launch, wrapping ``LlamaDecoderLayer``); ``save_model`` and ``checkpoint-N`` are plain HF folders; resuming from ``checkpoint-N`` continues the run;
configurations that cannot work stop with what to change.

As in tests/test_fsdp.py, all 2-process runs share one launch; its worker is this file run as a script
(``python tests/test_hf_fsdp.py SPEC.json``); the single-process references run in the pytest process.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "accelerate_fsdp2.yaml"

# As in tests/test_fsdp.py: the runs differ only in the order of floating-point sums.
RTOL = 1e-5
ATOL_WEIGHTS = 1e-4

TINY = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
        "model.flow_hidden=16"]
STEPS = 4
PER_RANK = 4  # 2 ranks x 4 rows = the single process's 8 rows per step; 16 rows: 2 steps per epoch
SCENARIOS = ("sft", "tb", "sft_lora")


def _config_kwargs(out: Path, data: Path, root: Path, name: str, batch: int) -> dict:
    """GFlowGRConfig keyword arguments of scenario ``name`` (JSON-serialisable: the worker gets them as is)."""
    kw = dict(output_dir=str(out), data_dir=str(data), max_steps=STEPS, per_device_train_batch_size=batch,
              learning_rate=3e-3, warmup_steps=1, logging_steps=1, report_to="none", use_cpu=True,
              eval_max_users=8, eval_beams=4, disable_tqdm=True, max_train_examples=16, seed=7,
              save_strategy="steps", save_steps=2, gflowgr_overrides=list(TINY))
    if name == "sft":
        kw.update(stage="sft")
    elif name == "sft_llama":  # from config, the other decoder family
        kw.update(stage="sft", gflowgr_overrides=[*TINY, "model.arch=llama"])
    elif name == "sft_lora":  # PEFT LoRA on the attention, the base weights frozen but sharded too
        kw.update(stage="sft_continue", init_checkpoint=str(root / "init_qwen2"), lora_r=4, lora_alpha=8,
                  lora_target_modules=["q_proj", "v_proj"])
    else:  # TB with the on-policy sampler (beam search on the consolidated policy inside the sharded forward),
        # whose augmentations, unlike the random samplers', are the same on every rank and in one process.
        kw.update(stage="gflowgr", objective="tb", gfn_sampler="onpolicy", n_aug=2,
                  init_checkpoint=str(root / "init_qwen2"),
                  gflowgr_overrides=[*TINY, "gfn.reward.use_cm=false"])
    return kw


def _run(kw: dict, resume: str | None = None) -> dict:
    """Train one scenario, save the final model, evaluate; returns what the test compares."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from transformers import TrainerCallback

    from gflowgr_core.hf_trainer import GFlowGRConfig, GFlowGRTrainer

    steps_run = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    trainer = GFlowGRTrainer(GFlowGRConfig(**kw), callbacks=[CountSteps()])
    trainer.train(resume_from_checkpoint=resume)
    out = Path(kw["output_dir"])
    trainer.save_model(str(out / "final"))
    metrics = trainer.evaluate()
    return {"log": trainer.state.log_history, "eval": metrics, "fsdp": trainer.is_fsdp_enabled,
            "units": sum(isinstance(m, FSDPModule) for m in trainer.model.modules()),
            "sharded": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
            "world_size": trainer.args.world_size, "steps_run": steps_run}


def worker(spec_path: str) -> None:
    """Under ``accelerate launch``: run every scenario of the spec; rank 0 writes ``<output_dir>/run.json``."""
    spec = json.loads(Path(spec_path).read_text())
    for scenario in spec:
        result = _run(scenario["kwargs"], scenario.get("resume"))
        if int(os.environ.get("RANK", "0")) == 0:
            (Path(scenario["kwargs"]["output_dir"]) / "run.json").write_text(json.dumps(result))
    from gflowgr_core.train.distributed import leave_process_group

    leave_process_group()  # accelerate's group, held by the finished trainers' reference cycles


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs accelerate and torch.distributed with gloo")


def _launch(spec_file: Path, spec: list[dict], *options: str) -> None:
    """``accelerate launch --config_file examples/accelerate_fsdp2.yaml`` on 2 processes running ``spec``."""
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           *options, str(Path(__file__).resolve()), str(spec_file)]
    proc = subprocess.run(cmd, cwd=spec_file.parent, env=env, capture_output=True, text=True, timeout=900)
    first = proc.stderr.find("Traceback")  # a failing rank's own traceback, before torchrun's summary
    # What a rank printed before it, too: an abort leaves no Python traceback, only the launcher's.
    assert proc.returncode == 0, (proc.stderr[max(0, first - 3000):first + 6000] if first >= 0
                                  else proc.stderr[-6000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, beauty_tiny):
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.train.checkpoint import save_policy
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    root = tmp_path_factory.mktemp("hf_fsdp")
    data = root / "data"
    prepared = prepare("letter", beauty_tiny, data, max_users=16)
    init = Trainer(load_config(None, [f"data={data}", f"out={root / 'build'}", "stage=sft", "device=cpu", *TINY]),
                   prepared)
    save_policy(init.policy, root / "init_qwen2")
    spec = [{"kwargs": _config_kwargs(root / name, data, root, name, PER_RANK)} for name in SCENARIOS]
    # Stopped-and-resumed: a fresh run that resumes from the SFT run's checkpoint-2 and trains to step 4.
    spec.append({"kwargs": _config_kwargs(root / "sft_resumed", data, root, "sft", PER_RANK),
                 "resume": str(root / "sft" / "checkpoint-2")})
    _launch(root / "spec.json", spec)
    # The same with the other checkpoint format accelerate writes (optimizer.bin instead of optimizer_0/).
    full = [{"kwargs": _config_kwargs(root / "sft_full", data, root, "sft", PER_RANK)},
            {"kwargs": _config_kwargs(root / "sft_full_resumed", data, root, "sft", PER_RANK),
             "resume": str(root / "sft_full" / "checkpoint-2")}]
    _launch(root / "spec_full.json", full, "--fsdp_state_dict_type", "FULL_STATE_DICT")
    # The single-process references at the same global batch, in this (undistributed) process.
    for name in SCENARIOS:
        result = _run(_config_kwargs(root / f"{name}_one", data, root, name, 2 * PER_RANK))
        (root / f"{name}_one" / "run.json").write_text(json.dumps(result))
    return root


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, beauty_tiny):
    """SFT on a tiny Llama: 2 processes (the example config with ``LlamaDecoderLayer`` as the unit class) and the
    single-process reference."""
    from gflowgr_core.data.prepared import prepare

    root = tmp_path_factory.mktemp("hf_fsdp_llama")
    data = root / "data"
    prepare("letter", beauty_tiny, data, max_users=16)
    _launch(root / "spec.json", [{"kwargs": _config_kwargs(root / "sft_llama", data, root, "sft_llama", PER_RANK)}],
            "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer")
    result = _run(_config_kwargs(root / "sft_llama_one", data, root, "sft_llama", 2 * PER_RANK))
    (root / "sft_llama_one" / "run.json").write_text(json.dumps(result))
    return root


def _steps(run: dict) -> list[dict]:
    return [r for r in run["log"] if "loss" in r]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from gflowgr_core.train.checkpoint import load_policy

    return load_policy(folder, recover=False).state_dict()


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_match_one_process(runs, name):
    _check_two_ranks_match_one_process(runs, name)


def test_two_ranks_match_one_process_llama(llama_run):
    _check_two_ranks_match_one_process(llama_run, "sft_llama")
    model = json.loads((llama_run / "sft_llama" / "run.json").read_text())
    assert model["sharded"]
    cfg = json.loads((llama_run / "sft_llama" / "final" / "lm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def _check_two_ranks_match_one_process(root: Path, name: str) -> None:
    two = json.loads((root / name / "run.json").read_text())
    one = json.loads((root / f"{name}_one" / "run.json").read_text())
    # Really sharded: 2 decoder-layer units + the root, every parameter a DTensor.
    assert two["fsdp"] and two["world_size"] == 2 and two["units"] == 3 and two["sharded"]
    assert not one["fsdp"] and one["world_size"] == 1
    a, b = _steps(two), _steps(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert math.isclose(ra[key], rb[key], rel_tol=RTOL, abs_tol=1e-7), (name, ra["step"], key, ra, rb)
    if name == "tb":
        # The per-rank stage values are logged as rank 0's means; the balance loss really ran.
        assert all(r["gfn"] > 0 for r in a)
    wa, wb = _weights(root / name / "final"), _weights(root / f"{name}_one" / "final")
    assert wa.keys() == wb.keys()
    if name in ("tb", "sft_lora"):  # started from init_qwen2: training moved the weights, so equality means something
        start = _weights(root / "init_qwen2")
        assert max(float((wb[k] - start[k]).abs().max()) for k in wb if k in start) > 1e-3
    for k in wb:
        assert torch.allclose(wa[k], wb[k], rtol=RTOL, atol=ATOL_WEIGHTS), (name, k, float((wa[k] - wb[k]).abs().max()))
    # Beam-search validation on the consolidated policy, users split over the ranks.
    assert two["eval"] == pytest.approx(one["eval"], rel=1e-6)


def test_saved_folders_are_plain_hf_models(runs):
    from transformers import AutoModelForCausalLM

    from gflowgr_core.hf_trainer import STATE_FILE

    root = runs
    prompt = torch.tensor([[1, 5, 40, 3]])
    for folder in (root / "sft" / "final", root / "sft" / "checkpoint-2", root / "tb" / "final",
                   root / "sft_lora" / "final"):
        assert (folder / STATE_FILE).is_file() and (folder / "config.yaml").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder / "lm")
        assert not any("lora" in k for k in model.state_dict())  # adapters merged
        lm = {k: v for k, v in _weights(folder).items() if k.startswith("model.")}
        for k, v in model.state_dict().items():
            assert torch.equal(v, lm[f"model.{k}"]), (folder, k)
        assert model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)


@pytest.mark.parametrize("name", ["sft", "sft_full"])
def test_resume_from_checkpoint_continues_the_run(runs, name):
    """``sft``: accelerate's SHARDED_STATE_DICT checkpoint (``optimizer_0/``), ``sft_full``: FULL_STATE_DICT
    (``optimizer.bin``); both hold the flow heads without optimiser state (no gradient under SFT)."""
    root = runs
    assert (root / name / "checkpoint-2" / ("optimizer_0" if name == "sft" else "optimizer.bin")).exists()
    full = json.loads((root / name / "run.json").read_text())
    resumed = json.loads((root / f"{name}_resumed" / "run.json").read_text())
    # Only steps 3 and 4 ran, from the checkpoint's weights, optimiser shards and scheduler; the log of steps 1-2
    # comes back from the checkpoint.
    assert full["steps_run"] == [1, 2, 3, 4] and resumed["steps_run"] == [3, 4]
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in _steps(full)]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in _steps(resumed)] == want
    wa, wb = _weights(root / f"{name}_resumed" / "final"), _weights(root / name / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


# ------------------------------------------------------------------------------ configurations that cannot work
def test_fsdp_without_a_distributed_launch_says_how_to_launch(monkeypatch, tmp_path, beauty_tiny):
    from gflowgr_core.hf_trainer import GFlowGRConfig, GFlowGRTrainer
    from gflowgr_core.train.config import ConfigError

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    args = GFlowGRConfig(output_dir=str(tmp_path), data_dir=str(tmp_path / "data"), stage="sft", use_cpu=True,
                         report_to="none")
    with pytest.raises(ConfigError, match="accelerate launch --config_file examples/accelerate_fsdp2.yaml"):
        GFlowGRTrainer(args)


def _plugin(**kw):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**{"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap", **kw})


def test_fsdp_plugin_checks_name_what_to_change(monkeypatch):
    from gflowgr_core.hf_trainer import check_fsdp_plugin
    from gflowgr_core.model.policy import build_tiny_causal_lm
    from gflowgr_core.train.config import ConfigError

    # The plugin writes cpu_ram_efficient_loading into the environment, where later plugins read it: restored
    # after the test.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    model = build_tiny_causal_lm(20, hidden=16, layers=2, heads=2, arch="qwen2")
    head = model.get_output_embeddings()
    assert check_fsdp_plugin(_plugin(), model, head) == ["Qwen2DecoderLayer"]
    assert check_fsdp_plugin(_plugin(transformer_cls_names_to_wrap=["Qwen2DecoderLayer"]), model, head) == [
        "Qwen2DecoderLayer"]
    with pytest.raises(ConfigError, match=r"names \['LlamaDecoderLayer'\].*fsdp_transformer_layer_cls_to_wrap: "
                                          r"Qwen2DecoderLayer"):
        check_fsdp_plugin(_plugin(transformer_cls_names_to_wrap=["LlamaDecoderLayer"]), model, head)
    with pytest.raises(ConfigError, match="holds the LM head"):
        check_fsdp_plugin(_plugin(transformer_cls_names_to_wrap=["Qwen2ForCausalLM"]), model, head)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_fsdp_plugin(_plugin(fsdp_version=1), model, head)
    with pytest.raises(ConfigError, match="TRANSFORMER_BASED_WRAP"):
        check_fsdp_plugin(_plugin(auto_wrap_policy="size_based_wrap"), model, head)
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading: false"):
        check_fsdp_plugin(_plugin(cpu_ram_efficient_loading=True), model, head)
    model._no_split_modules = []
    with pytest.raises(ConfigError, match="no decoder layer class to wrap"):
        check_fsdp_plugin(_plugin(cpu_ram_efficient_loading=False), model, head)


def test_example_config_is_fsdp2_with_the_decoder_layer():
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    fsdp = cfg["fsdp_config"]
    assert cfg["distributed_type"] == "FSDP" and cfg["use_cpu"] is False and cfg["mixed_precision"] == "no"
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


if __name__ == "__main__":
    worker(sys.argv[1])
