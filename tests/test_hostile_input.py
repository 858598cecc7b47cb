"""Hostile input: every bad file, id, shape, number or setting fails with an error naming what and where."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gflowgr_core import debug
from gflowgr_core.data.loaders import DataError, load_csv, load_letter, load_p5
from gflowgr_core.data.prepared import PreparedData
from gflowgr_core.data.split import leave_one_out
from gflowgr_core.decoding.step import constrained_step
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.objectives.gfn_loss import gfn_loss
from gflowgr_core.reward import Reward, RewardConfig, RewardError
from gflowgr_core.samplers import SamplerError, make_sampler
from gflowgr_core.sid.catalog import Catalog
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie
from gflowgr_core.train.config import ConfigError, apply_overrides, load_config
from gflowgr_core.trajectories import ExampleBatch

ROOT = Path(__file__).resolve().parents[1]

CODES = torch.tensor([[0, 1], [1, 0], [1, 1], [2, 0]])
CPL = (3, 2)


@pytest.fixture(scope="module")
def trie() -> Trie:
    return Trie.build(CODES, CPL)


@pytest.fixture(scope="module")
def policy() -> SIDPolicy:
    tm = SIDTokenMap.from_scratch(CPL)
    return SIDPolicy(build_tiny_causal_lm(tm.vocab_size, hidden=16, layers=1, heads=2), tm, CODES, flow_hidden=8)


@pytest.fixture(autouse=True)
def _debug_off():
    previous = debug.set_debug(False)
    yield
    debug.set_debug(previous)


# ------------------------------------------------------------------------------- malformed / empty files
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("{bad json", r"X\.inter\.json: line 1 column 2: malformed JSON"),
    ("", r"X\.inter\.json: empty file"),
    (json.dumps({"u1": [1, None]}), r"user 'u1': element 1 is null; expected an item id"),
])
def test_malformed_letter_interactions(tmp_path, text, message):
    _write(tmp_path / "X.inter.json", text)
    with pytest.raises(DataError, match=message):
        load_letter(tmp_path)


def test_empty_and_malformed_text_files(tmp_path):
    with pytest.raises(DataError, match=r"user_sequence\.txt: empty file"):
        load_p5(_write(tmp_path / "user_sequence.txt", ""))
    with pytest.raises(DataError, match=r"e\.csv: empty file"):
        load_csv(_write(tmp_path / "e.csv", ""))
    with pytest.raises(DataError, match=r"f\.csv: line 3: malformed row, 1 field\(s\) \['3'\]"):
        load_csv(_write(tmp_path / "f.csv", "user,item\n1,2\n3\n"))


@pytest.mark.parametrize("text, message", [
    ("", r"idx\.json: not valid JSON"),
    ("[1, 2]", r"idx\.json: expected a JSON object mapping item id to a list of SID tokens, got list"),
    (json.dumps({"1": ["<a_1>", "<x2>"], "2": ["<a_0>", "<b_1>"]}),
     r"idx\.json: item '1': token 1: malformed SID token '<x2>'"),
])
def test_malformed_sid_index(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        Catalog.from_letter_index(_write(tmp_path / "idx.json", text), ["1", "2"])


def test_incomplete_folders_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a prepared dataset folder: missing stats\.json, items\.json"):
        PreparedData.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"policy\.json not found: not a directory written by SIDPolicy"):
        SIDPolicy.load(tmp_path)
    with pytest.raises(ValueError, match=r"tokens\.json: not valid JSON"):
        SIDTokenMap.load(_write(tmp_path / "tokens.json", "{oops"))
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid YAML"):
        load_config(_write(tmp_path / "cfg.yaml", "gfn: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------- unknown item ids
def test_item_without_sid(tmp_path):
    idx = _write(tmp_path / "idx.json", json.dumps({"1": ["<a_1>", "<b_0>"]}))
    with pytest.raises(ValueError, match=r"idx\.json: 1 item\(s\) have no SID, first '2'"):
        Catalog.from_letter_index(idx, ["1", "2"])


def test_unknown_items_in_tensors(policy):
    with pytest.raises(ValueError, match=r"history row 1, column 0: item id 9 is outside \[-1, 4\)"):
        policy.build_prompt(torch.tensor([[0, 1], [9, 2]]))
    reward = Reward(RewardConfig())
    with pytest.raises(RewardError, match=r"candidates must hold catalogue items in \[0, 4\); batch row\(s\) \[0\] hold \[7\]"):
        reward(torch.tensor([0]), torch.tensor([[0, 7]]), torch.tensor([[0.5, 0.5]]), CODES)
    batch = ExampleBatch(torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([5]))
    with pytest.raises(SamplerError, match=r"batch\.positive must hold items in \[0, 4\); batch row\(s\) \[0\] hold \[5\]"):
        make_sampler("random", n_items=4).sample(batch, 1, torch.Generator())


# ------------------------------------------------------------------------------------ SID length mismatch
def test_sid_length_mismatch(tmp_path, policy):
    idx = _write(tmp_path / "idx.json", json.dumps({"1": ["<a_1>", "<b_2>"], "2": ["<a_1>"]}))
    with pytest.raises(ValueError, match=r"idx\.json: item '1': SID .* has 2 token\(s\), expected 1"):
        Catalog.from_letter_index(idx, ["1", "2"])
    tm = SIDTokenMap.from_scratch(CPL)
    with pytest.raises(ValueError, match=r"item_codes must be an integer tensor \[n_items, 2\], got .* \(4, 3\)"):
        SIDPolicy(build_tiny_causal_lm(tm.vocab_size, hidden=16, layers=1, heads=2), tm,
                  torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must be an integer tensor \[B, T, 2\]"):
        policy.trajectory_hidden(torch.tensor([[0]]), torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must have shape \[\.\.\., 2\]"):
        tm.encode(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"trajectory codes\[0, 0\] has code 3 at level 0, outside \[0, 3\)"):
        policy.trajectory_hidden(torch.tensor([[0]]), torch.tensor([[[3, 0]]]))


# -------------------------------------------------------------------------------- NaN / inf rewards, CM
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cm_scores_name_the_component_and_row(bad):
    reward = Reward(RewardConfig())
    cm = torch.tensor([[0.5, 0.5], [0.5, bad]])
    with pytest.raises(RewardError, match=r"reward component 'cm_norm' is not finite .* batch row\(s\) \[1\]"):
        reward(torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 2]]), cm, CODES)


def test_non_finite_reward_settings_and_cm_model():
    from gflowgr_core.collaborative import CMScorer

    with pytest.raises(ValueError, match="RewardConfig.r_pos must be finite, got nan"):
        RewardConfig(r_pos=float("nan"))
    item_emb = torch.randn(5, 4)
    item_emb[3, 1] = float("nan")
    with pytest.raises(ValueError, match="CM item embedding of item 3 is NaN/inf"):
        CMScorer(torch.randn(2, 4), item_emb)


def test_non_finite_log_reward_in_debug_mode(trie):
    h, w = torch.randn(4, 2, 8), torch.randn(5, 8)
    log_r = torch.tensor([0.0, 0.0, float("nan"), 1.0])
    # Off: no host sync, the NaN flows into the loss (the training step then refuses the step).
    assert torch.isnan(gfn_loss(h, w, CODES, trie, torch.zeros(4, 1), torch.zeros(4), log_r).loss)
    with debug.debug_mode():
        with pytest.raises(FloatingPointError, match=r"gfn_loss: log_r is not finite at row\(s\) \[2\] \(values \[nan\]\)"):
            gfn_loss(h, w, CODES, trie, torch.zeros(4, 1), torch.zeros(4), log_r)
        with pytest.raises(FloatingPointError, match=r"gfn_loss: log_f is not finite at row\(s\) \[\(1, 0\)\]"):
            gfn_loss(h, w, CODES, trie, torch.tensor([[0.0], [float("inf")], [0.0], [0.0]]), torch.zeros(4),
                     torch.zeros(4))


# ------------------------------------------------------------------------------- zero-length histories
def test_users_without_enough_items_are_counted_and_reported(tmp_path, caplog):
    _write(tmp_path / "X.inter.json", json.dumps({"u1": [1, 2, 3, 4], "u2": [], "u3": [1, 2]}))
    interactions = load_letter(tmp_path)
    assert interactions.lengths().tolist() == [4, 0, 2]  # kept by the loader, nothing silently lost
    with caplog.at_level(logging.WARNING, logger="gflowgr"):
        split = leave_one_out(interactions)
    assert split.dropped_users == 2 and split.stats()["dropped_users"] == 2
    assert any("2" in r.getMessage() and "fewer than 3" in r.getMessage() for r in caplog.records), caplog.text
    assert bool((split.train.history >= 0).any(dim=1).all()), "every training example has at least one item"


def test_history_without_items_is_the_cold_start_prompt(policy):
    tm = policy.token_map
    for history in (torch.tensor([[-1, -1]]), torch.zeros(1, 0, dtype=torch.long)):
        ids, mask, _ = policy.build_prompt(history)
        assert ids.tolist() == [[tm.bos_id, tm.sep_id]] and mask.tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="history has no rows"):
        policy.build_prompt(torch.zeros(0, 3, dtype=torch.long))


# --------------------------------------------------------------------- trie node ids out of range (debug)
@pytest.mark.parametrize("nodes, message", [
    ([0, 99], r"trie node id\(s\) \[99\] at row\(s\) \[1\] are not nodes of level 1: expected -1 \(dead row\) or an id in \[1, 4\)"),
    ([1, -5], r"node id\(s\) \[-5\] at row\(s\) \[1\]"),
    ([4, 2], r"node id\(s\) \[4\] at row\(s\) \[0\]"),   # a level-2 node passed at level 1
])
def test_step_node_out_of_range_in_debug_mode(trie, nodes, message):
    h, w = torch.randn(2, 8), torch.randn(2, 8)
    node = torch.tensor([n if n != 0 else 1 for n in nodes])
    with debug.debug_mode():
        with pytest.raises(IndexError, match=r"constrained_step: (trie )?" + message.removeprefix("trie ")):
            constrained_step(h, w, node, 1, trie, "sample", seed=3)
        with pytest.raises(IndexError, match=message):
            constrained_step(h, w, node, 1, trie, "beam", scores=torch.zeros(1, 2))
    ok = constrained_step(h, w, torch.tensor([1, -1]), 1, trie, "sample", seed=3)
    assert ok.code[1] == -1


def test_debug_checks_cost_nothing_when_off(trie, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("debug check ran while debug mode is off")

    monkeypatch.setattr(debug, "check_trie_nodes", fail)
    monkeypatch.setattr(debug, "check_finite", fail)
    constrained_step(torch.randn(2, 8), torch.randn(3, 8), torch.tensor([0, 0]), 0, trie, "sample", seed=1)
    gfn_loss(torch.randn(4, 2, 8), torch.randn(5, 8), CODES, trie, torch.zeros(4, 1), torch.zeros(4), torch.zeros(4))


def test_debug_mode_from_environment():
    code = "import gflowgr_core.debug as d; print(d.enabled())"
    env = dict(os.environ, GFLOWGR_DEBUG="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env["GFLOWGR_DEBUG"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- config keys that don't exist
def test_unknown_config_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.gfn: unknown key 'no_such_key'; known keys: .*n_aug"):
        load_config(None, ["data=x", "gfn.no_such_key=1"])
    with pytest.raises(ConfigError, match=r"config: unknown key 'lrr'; known keys: .*\blr\b"):
        load_config(None, ["data=x", "lrr=1"])
    yaml_path = _write(tmp_path / "c.yaml", "data: x\nmodel:\n  hiden: 64\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.model: unknown key 'hiden'"):
        load_config(yaml_path)
    with pytest.raises(ConfigError, match=r"override 'gfn\.n_aug' is not of the form key=value"):
        apply_overrides({}, ["gfn.n_aug"])
    with pytest.raises(ConfigError, match=r"config\.gfn\.n_aug: cannot read 'many' as int"):
        load_config(None, ["data=x", "gfn.n_aug=many"])


# ------------------------------------------------------------------------------------- out of memory
def test_oom_hint_names_the_batch_size_to_try():
    with pytest.raises(torch.OutOfMemoryError, match=r"step: out of memory at batch size 64 \(4 trajectories "
                                                     r"per example\); try batch_size=32 \(with gradient accumulation x2"):
        with debug.oom_hint(64, "step", trajectories=4):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory at batch size 1: the model does not fit"):
        with debug.oom_hint(1, "step"):
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="^unrelated$"):  # other errors pass through untouched
        with debug.oom_hint(8, "step"):
            raise RuntimeError("unrelated")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers' Trainer needs accelerate")
def test_hf_training_step_oom_and_non_finite_loss(tmp_path, monkeypatch, beauty_tiny):
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.hf_trainer import GFlowGRConfig, GFlowGRTrainer

    prepare("letter", beauty_tiny, tmp_path / "data", max_users=40)
    args = GFlowGRConfig(output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), stage="sft",
                         max_steps=1, per_device_train_batch_size=12, report_to="none", use_cpu=True,
                         save_strategy="no", disable_tqdm=True,
                         gflowgr_overrides=["model.hidden=16", "model.layers=1", "model.heads=2", "model.kv_heads=2",
                                            "model.intermediate=32", "model.flow_hidden=8"])
    trainer = GFlowGRTrainer(args)

    def oom(index, step=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer.core, "compute_loss", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory at batch size 12 .*try "
                                                     r"per_device_train_batch_size=6"):
        trainer.train()

    def nan_loss(index, step=None):
        loss = torch.tensor(float("nan"), requires_grad=True)
        return loss, {"loss": float("nan"), "ce": float("nan")}

    monkeypatch.setattr(trainer.core, "compute_loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 0 on split rows"):
        trainer.compute_loss(trainer.model, trainer.data_collator([{"index": 0}, {"index": 1}]))
