"""The config reference (docs/config.md generated from the dataclasses), --print-config, --version, override
errors that name the override, values refused at load, and the model an init_checkpoint imposes."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from gflowgr_core.cli import main
from gflowgr_core.train import config_doc
from gflowgr_core.train.config import (CHOICES, ConfigError, ModelConfig, TrainConfig, checkpoint_model_config,
                                       load_config, select_metric_names)

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "mixture":
            out.update(_flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------------------------- reference
def test_docs_config_md_is_up_to_date():
    assert DOC.is_file(), "docs/config.md is missing: run `python -m gflowgr_core.train.config_doc`"
    assert DOC.read_text() == config_doc.config_reference(), \
        "docs/config.md is stale: run `python -m gflowgr_core.train.config_doc`"


def test_reference_lists_every_key_with_its_default_and_a_meaning():
    rows = {r.key: r for _, _, section in config_doc.config_rows() for r in section}
    defaults = _flat_keys(TrainConfig().to_dict())
    assert set(rows) == set(defaults)
    for key, value in defaults.items():
        assert yaml.safe_load(rows[key].default.replace("`", "")) == \
            (list(value) if isinstance(value, tuple) else value), key
        assert len(rows[key].meaning) > 8, key
    for key, allowed in CHOICES.items():  # every allowed value is named, by the comment or an added list
        assert all(str(value) in rows[key].meaning for value in allowed), key
    assert "Must be >= 1" in rows["eval_every"].meaning
    text = config_doc.config_reference()
    assert "| `gfn.reward.beta` | float | `1.0` |" in text and "## `gfn.reward` (RewardConfig)" in text


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert config_doc.main(["--out", str(out), "--check"]) == 1
    assert config_doc.main(["--out", str(out)]) == 0
    assert config_doc.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("`0.001`", "`0.002`"))
    assert config_doc.main(["--out", str(out), "--check"]) == 1
    assert "stale" in capsys.readouterr().err


@dataclasses.dataclass
class _Undocumented:
    """A config section with a field nobody explained."""

    width: int = 3   # explained
    depth: int = 2


def test_an_undocumented_field_fails_the_generator():
    with pytest.raises(ValueError, match=r"_Undocumented: field\(s\) \['depth'\] have no documentation"):
        config_doc.field_docs(_Undocumented)


# -------------------------------------------------------------------------------------------- CLI commands
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("gflowgr 0.")


def test_print_config_prints_the_merged_config_and_exits(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {tmp_path / 'data'}\nout: {tmp_path / 'out'}\nepochs: 4\ngfn:\n  n_aug: 2\n")
    assert main(["train", "--config", str(path), "epochs=7", "gfn.reward.r_pos=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 7 and printed["gfn"]["n_aug"] == 2 and printed["gfn"]["reward"]["r_pos"] == 3.0
    assert printed["lr"] == TrainConfig().lr
    assert not (tmp_path / "out").exists(), "--print-config must not start a run"
    # what it prints is itself a config file that loads to the same config
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert load_config(again) == load_config(path, ["epochs=7", "gfn.reward.r_pos=3"])


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["train", "data=x", "epoch=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gflowgr train: error: override `epoch=1`: unknown key 'epoch'; did you mean `epochs`?")
    assert "\n" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "data=x", f"out={tmp_path / 'o'}", "device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "override `device=cuda`: device='cuda' but CUDA is not available" in err
    # --print-config shows a config meant for another machine
    assert main(["train", "data=x", "device=cuda", "--print-config"]) == 0


# ------------------------------------------------------------------------------------- where errors come from
def test_override_mistakes_name_the_override(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data=x", "epoch=1"])
    assert str(info.value).startswith("override `epoch=1`: unknown key 'epoch'; did you mean `epochs`?")
    with pytest.raises(ConfigError, match=r"^override `gfn.n_agu=2`: unknown key 'n_agu'; did you mean `gfn.n_aug`"):
        load_config(None, ["data=x", "gfn.n_agu=2"])
    with pytest.raises(ConfigError, match=r"^override `lr=fast`: config.lr: cannot read 'fast' as float"):
        load_config(None, ["data=x", "lr=fast"])
    with pytest.raises(ConfigError, match=r"^override `lr.peak=1`: config.lr is a value, not a section"):
        load_config(None, ["data=x", "lr.peak=1"])
    path = tmp_path / "c.yaml"
    path.write_text("data: x\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'epoch'; known keys: .*; did you mean `epochs`\?$"):
        load_config(path, ["lr=0.1"])


def test_refused_values_name_the_file_or_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: x\nbatch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: batch_size=0 must be >= 1$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override `batch_size=0`: batch_size=0 must be >= 1$"):
        load_config(path, ["batch_size=8", "batch_size=0"])
    assert load_config(path, ["batch_size=8"]).batch_size == 8
    # an invariant of a nested class is checked on the merged config, then blamed on the override
    with pytest.raises(ConfigError, match=r"^override `gfn.reward.beta=-1`: .*beta must be > 0"):
        load_config(None, ["data=x", "gfn.reward.beta=-1"])
    # two overrides that are only valid together are accepted together
    cfg = load_config(None, ["data=x", "gfn.reward.use_a=false", "gfn.reward.r_pos_mode=fixed"])
    assert cfg.gfn.reward.use_a is False


@pytest.mark.parametrize("override, fragment", [
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("lr=-0.001", "lr=-0.001 must be >= 0"),
    ("max_steps=-5", "max_steps=-5 must be >= 1"),
    ("max_steps=0", "max_steps=0 must be >= 1"),
    ("epochs=0", "epochs=0 must be >= 1"),
    ("eval_every=0", "eval_every=0 must be >= 1"),
    ("pref.n_neg=0", "pref.n_neg=0 must be >= 1 (0 negatives would turn S-DPO into plain cross-entropy)"),
    ("gfn.lambda_gfn=-1", "gfn.lambda_gfn=-1.0 must be >= 0"),
    ("pref.beta=-0.1", "pref.beta=-0.1 must be > 0"),
    ("pref.beta=0", "pref.beta=0.0 must be > 0"),
    ("gfn.reward.beta=-2", "RewardConfig.beta must be > 0"),
    ("select_metric=ndcg10", "select_metric='ndcg10' is not a validation metric; did you mean 'ndcg@10'?"),
    ("select_metric=NDCG@20", "did you mean 'ndcg@20'?"),
    ("gfn.objective=tbb", "gfn.objective='tbb' is not one of ('tb', 'db', 'subtb')"),
    ("lr=nan", "lr=nan must be >= 0"),
])
def test_values_that_cannot_work_are_refused_at_load(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data=x", override])
    message = str(info.value)
    assert message.startswith(f"override `{override}`: ") and fragment in message


def test_select_metric_names_are_the_validation_keys():
    names = select_metric_names()
    assert {"ndcg@10", "recall@20", "renorm/ndcg@10", "sid_ndcg@5"} <= set(names)
    for name in ("recall@20", "renorm/ndcg@5", "coverage@10"):
        assert load_config(None, ["data=x", f"select_metric={name}"]).select_metric == name


def test_warmup_longer_than_the_run_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"warmup_steps=100 is longer than the run \(10 steps: max_steps\)"):
        load_config(None, ["data=x", "max_steps=10"])
    data = tmp_path / "data"
    data.mkdir()
    (data / "stats.json").write_text(json.dumps({"num_train_examples": 1000}))
    with pytest.warns(UserWarning, match=r"longer than the run \(8 steps: 2 epoch\(s\) of 4 steps\)"):
        load_config(None, [f"data={data}", "epochs=2", "batch_size=256", "warmup_steps=9"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, [f"data={data}", "epochs=2", "batch_size=256", "warmup_steps=9"])  # said once
        load_config(None, [f"data={data}", "epochs=2", "batch_size=256", "warmup_steps=8"])
        load_config(None, ["data=x", "warmup_steps=100"])  # run length unknown: no warning


# ------------------------------------------------------------------------------------------ init_checkpoint
class _FakePolicy:
    def __init__(self, **lm):
        from transformers import Qwen2Config

        self.model = type("LM", (), {"config": Qwen2Config(**lm)})()
        self.flow_hidden = 16


def test_checkpoint_model_config_warns_about_overridden_settings():
    policy = _FakePolicy(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=48)
    configured = ModelConfig(hidden=64, layers=4)  # hidden set by the user; layers=4 is the default
    with pytest.warns(UserWarning) as record:
        actual = checkpoint_model_config(policy, configured, "runs/sft/best")
    message = str(record[0].message)
    assert "init_checkpoint=runs/sft/best" in message and "model.hidden=64 (checkpoint: 32)" in message
    assert "model.layers" not in message
    assert actual == ModelConfig(arch="qwen2", hidden=32, layers=1, heads=2, kv_heads=2, intermediate=48,
                                 pretrained=None, flow_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings equal to the checkpoint's: nothing to say
        assert checkpoint_model_config(policy, actual, "x") == actual


def test_stage_two_records_the_checkpoint_model(tmp_path, beauty_tiny):
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.train.checkpoint import save_policy
    from gflowgr_core.train.trainer import Trainer

    tiny = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=48",
            "model.flow_hidden=16"]
    data = prepare("letter", beauty_tiny, tmp_path / "data", max_users=30)
    sft = Trainer(load_config(None, [f"data={tmp_path / 'data'}", f"out={tmp_path / 'sft'}", *tiny]), data)
    save_policy(sft.policy, tmp_path / "init", sft.cfg)
    run = load_config(None, [f"data={tmp_path / 'data'}", f"out={tmp_path / 'tb'}", "stage=gflowgr",
                             f"init_checkpoint={tmp_path / 'init'}", "model.hidden=256", "gfn.sampler=random",
                             "gfn.reward.use_cm=false", "max_steps=1", "warmup_steps=0", "batch_size=4",
                             "valid_max_users=4", "evaluate_test=false", "eval_beams=4", "gfn.n_aug=1"])
    with pytest.warns(UserWarning, match=r"model.hidden=256 \(checkpoint: 32\)"):
        trainer = Trainer(run, data)
    assert trainer.cfg.model.hidden == 32 and run.model.hidden == 256  # the caller's config is not changed
    trainer.fit()
    saved = yaml.safe_load((tmp_path / "tb" / "config.yaml").read_text())
    assert saved["model"]["hidden"] == 32 and saved["model"]["layers"] == 1 and saved["model"]["flow_hidden"] == 16
