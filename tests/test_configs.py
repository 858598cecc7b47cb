"""The reproduction grid: every YAML under configs/ loads, stage-2 methods share one budget and model,
the ablation overrides apply, and benchmarks/run_quality.py plans, skips, resumes and aggregates runs."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gflowgr_core.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA = Path(os.environ.get("GFLOWGR_DATA", REPO.parent / "shared" / "data"))
BEAUTY = DATA / "letter" / "Beauty"
DATASETS = ("beauty", "sports", "toys")
METHODS = ("sft", "sft_continue", "dpo", "sdpo", "gflowgr_tb", "gflowgr_db", "gflowgr_subtb")
STAGE = {"sft": "sft", "sft_continue": "sft_continue", "dpo": "dpo", "sdpo": "sdpo",
         "gflowgr_tb": "gflowgr", "gflowgr_db": "gflowgr", "gflowgr_subtb": "gflowgr"}
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
# Fields every stage-2 run of a dataset must share so that baselines and GFlowGR get the same budget.
SHARED_STAGE2 = ("epochs", "max_steps", "batch_size", "max_train_examples", "lr", "weight_decay",
                 "warmup_steps", "grad_clip", "eval_every", "patience", "eval_beams", "valid_max_users",
                 "select_metric", "dtype", "likelihood_support", "model")


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_quality", REPO / "benchmarks" / "run_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_quality"] = module
    spec.loader.exec_module(module)
    return module


def _benchmark(name: str):
    """A module of benchmarks/ (they import each other by bare name, so the folder is on the path meanwhile)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


runner = _load_runner()


def test_grid_is_complete():
    found = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    expected = {f"{ds}/{m}.yaml" for ds in DATASETS for m in METHODS}
    assert expected <= found, f"missing configs: {sorted(expected - found)}"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_yaml_loads(path):
    cfg = load_config(path)  # unknown keys, bad types or bad choices raise ConfigError
    folder, method = path.parent.name, path.stem
    dataset = folder.removesuffix("_cpu")  # configs/<dataset>_cpu: the CPU protocol of that dataset
    assert cfg.stage == STAGE[method]
    assert cfg.data == f"runs/data/{dataset}"
    assert cfg.out == f"runs/{folder}/{method}/seed42"
    if method != "sft":
        assert cfg.init_checkpoint == f"runs/{folder}/sft/seed42/best"
    assert cfg.dtype == "bfloat16" and cfg.batch_size >= (256 if folder.endswith("_cpu") else 512)
    assert (cfg.model.arch, cfg.model.hidden, cfg.model.layers, cfg.model.pretrained) == ("qwen2", 128, 4, None)


def test_a_typo_in_a_yaml_fails(tmp_path):
    text = (CONFIGS / "beauty" / "gflowgr_tb.yaml").read_text().replace("  n_aug: 3", "  n_augs: 3")
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="n_augs"):
        load_config(bad)


def test_yaml_words_on_off_stay_words_for_text_fields(tmp_path):
    """``distributed: off`` is the word "off" (YAML 1.1 would read a boolean); boolean fields still take
    on/off/yes/no, from a file and from an override."""
    path = tmp_path / "words.yaml"
    path.write_text("data: x\ndistributed: off\npacking: off\nevaluate_test: yes\nstage: sft\n")
    cfg = load_config(path)
    assert (cfg.distributed, cfg.packing, cfg.evaluate_test) == ("off", False, True)
    cfg = load_config(None, ["data=x", "distributed=off", "handle_signals=on", "resume=no"])
    assert (cfg.distributed, cfg.handle_signals, cfg.resume) == ("off", True, False)
    with pytest.raises(ConfigError, match="cannot read 'maybe' as bool"):
        load_config(None, ["data=x", "packing=maybe"])


@pytest.mark.parametrize("dataset", [*DATASETS, "beauty_cpu"])
def test_stage2_methods_share_budget_and_model(dataset):
    cfgs = {m: load_config(CONFIGS / dataset / f"{m}.yaml") for m in METHODS}
    ref = dataclasses.asdict(cfgs["gflowgr_tb"])
    # beauty_cpu: each method's rate was tuned on validation (test_beauty_cpu_stage2_rates_are_the_ones_selected_...)
    shared = [k for k in SHARED_STAGE2 if not (dataset == "beauty_cpu" and k == "lr")]
    for method in METHODS[1:]:
        other = dataclasses.asdict(cfgs[method])
        diff = {k: (other[k], ref[k]) for k in shared if other[k] != ref[k]}
        assert not diff, f"{dataset}/{method} differs from gflowgr_tb in {diff}"
    assert cfgs["sft"].model == cfgs["gflowgr_tb"].model
    assert cfgs["sft"].batch_size == cfgs["gflowgr_tb"].batch_size
    # Same model across datasets too (the size stated in the YAML headers).
    assert cfgs["gflowgr_tb"].model == load_config(CONFIGS / "beauty" / "gflowgr_tb.yaml").model


@pytest.mark.parametrize("dataset", [*DATASETS, "beauty_cpu"])
def test_gflowgr_variants_differ_only_in_objective(dataset):
    cfgs = {m: load_config(CONFIGS / dataset / f"{m}.yaml") for m in ("gflowgr_tb", "gflowgr_db", "gflowgr_subtb")}
    for method, cfg in cfgs.items():
        assert cfg.gfn.objective == method.split("_")[1]
        assert dataclasses.replace(cfg.gfn, objective="tb") == cfgs["gflowgr_tb"].gfn
        assert cfg.gfn.sampler == "cm_curriculum" and cfg.gfn.n_aug == 3
        if dataset != "beauty_cpu":  # beauty_cpu: test_beauty_cpu_yamls_hold_the_setting_selected_on_validation
            # lambda_gfn 0.1, beta 2 and the catalogue-scaled r_pos: picked on MovieLens-100K (docs/reproduce.md)
            r = cfg.gfn.reward
            assert cfg.gfn.lambda_gfn == 0.1 and r.beta == 2.0 and r.r_pos_mode == "catalogue"
        assert cfg.cm == cfgs["gflowgr_tb"].cm
    sdpo = load_config(CONFIGS / dataset / "sdpo.yaml")
    assert sdpo.pref.n_neg == cfgs["gflowgr_tb"].gfn.n_aug  # as many extra trajectories as GFlowGR


# tuning stage -> (its results file, the Beauty CPU YAMLs that hold its selected setting)
TUNED_YAMLS = {"gflowgr": ("tune_beauty_cpu.json", ("gflowgr_tb", "gflowgr_db", "gflowgr_subtb")),
               "sft": ("tune_beauty_sft_cpu.json", ("sft",))}


def tuning_rounds(stage: str) -> list[dict]:
    """The results files of ``stage``'s tuning rounds (``tune_quality.py --round N``), latest first."""
    first = REPO / "benchmarks" / "results" / TUNED_YAMLS[stage][0]
    later = first.parent.glob(f"{first.stem}_round*.json")
    return sorted((json.loads(f.read_text()) for f in [first, *later]), key=lambda t: -t.get("round", 1))


def yaml_pick(stage: str) -> dict:
    """The round whose pick the YAMLs hold: the latest one that picked one of its tuning rows (a later round
    whose pick is the grid's own run kept the YAMLs as they were)."""
    settings = _benchmark("tune_quality").STAGES[stage][0]
    return next(t for t in tuning_rounds(stage) if t["selected"] in settings)


@pytest.mark.parametrize("stage", list(TUNED_YAMLS))
def test_beauty_cpu_yamls_hold_the_setting_selected_on_validation(stage):
    """The Beauty CPU protocol's YAMLs hold the setting with the highest validation NDCG@10 of the latest tuning
    round that changed them (``selected`` in its results file): its overrides change nothing in them. Round 1
    picks among its rows; a later round among its rows and the grid's run of the YAML as it was."""
    tune_quality = _benchmark("tune_quality")
    for tuned in tuning_rounds(stage):
        pool = tuned["runs"] + [r for r in tuned["references"]
                                if tuned.get("round", 1) > 1 and r["setting"] in {x["method"] for x in tuned["runs"]}]
        assert tuned["selected"] == max(pool, key=lambda r: r["valid"]["ndcg@10"])["setting"]
    tuned = yaml_pick(stage)
    method, overrides = tune_quality.STAGES[stage][0][tuned["selected"]]
    for name in TUNED_YAMLS[stage][1]:
        path = CONFIGS / "beauty_cpu" / f"{name}.yaml"
        assert load_config(path, overrides) == load_config(path), f"{path} is not the setting {tuned['selected']!r}"


def test_every_tuning_setting_loads_and_changes_its_method_config():
    """A misspelt key or value in benchmarks/tune_quality.py's TUNING fails here, not after a run has started."""
    tune_quality = _benchmark("tune_quality")
    for name, (method, overrides) in {**tune_quality.TUNING, **tune_quality.SFT_TUNING,
                                      **tune_quality.LR_TUNING}.items():
        path = CONFIGS / "beauty_cpu" / f"{method}.yaml"
        tuned = load_config(path, overrides).validate()
        if name not in tuned_selected():
            assert tuned != load_config(path), f"the tuning setting {name!r} changes nothing in {path}"
    assert {m for m, _ in tune_quality.SFT_TUNING.values()} == {"sft"}
    # An SFT setting trains from scratch (no SFT checkpoint needed); a stage-2 one starts from the grid's SFT.
    root = Path("runs")
    sft, = tune_quality.plan_tuning("beauty", root, ["sft_cosine10"], None, 42, [], tune_quality.SFT_TUNING)
    assert sft.needs == [] and not any(o.startswith("init_checkpoint=") for o in sft.overrides)
    assert "evaluate_test=false" in sft.overrides
    tb, = tune_quality.plan_tuning("beauty", root, ["teacher"], None, 42, [])
    assert tb.needs == [root / "beauty" / "sft" / "seed42"]
    with pytest.raises(SystemExit, match="unknown setting"):
        tune_quality.plan_tuning("beauty", root, ["teacher"], None, 42, [], tune_quality.SFT_TUNING)


def _finish_tuning_run(spec, best: float) -> None:
    """A finished two-epoch run in ``spec.out``: its config, and a validation history peaking at ``best``."""
    from gflowgr_core.train.config import save_config

    save_config(load_config(spec.config_path, spec.overrides), spec.out / "config.yaml")
    keys = ("ndcg@10", "renorm/ndcg@10", "recall@10", "renorm/recall@10", "coverage@10")
    history = [{"epoch": e, "valid": {k: best - 0.001 * (2 - e) for k in keys}} for e in (1, 2)]
    (spec.out / "result.json").write_text(json.dumps({"status": "finished", "history": history, "epochs": 2,
                                                      "steps": 100, "train_seconds": 60.0}))


def test_sft_tuning_table_holds_each_finished_setting_and_the_grid_sft_as_reference(tmp_path):
    """``tune_quality.py --stage sft`` aggregates finished SFT settings (validation only) into their own table,
    with the grid's SFT run as the reference and the best setting selected; the report renders it as SFT."""
    tune_quality, report = _benchmark("tune_quality"), _benchmark("report")
    root, results = tmp_path / "runs", tmp_path / "results"
    grid_sft, = runner.plan_grid("beauty", ["sft"], [42], root, config_dir=CONFIGS / "beauty_cpu")
    tuned = tune_quality.plan_tuning("beauty", root, list(tune_quality.SFT_TUNING), CONFIGS / "beauty_cpu", 42, [],
                                     tune_quality.SFT_TUNING)
    for spec, best in ((grid_sft, 0.0464), (tuned[0], 0.0470), (tuned[1], 0.0481)):  # tuned[2] unfinished
        spec.out.mkdir(parents=True)
        _finish_tuning_run(spec, best)
    # Per-user validation ranks of the best epoch (what the trainer keeps in best/) for two of the three runs.
    rng = np.random.default_rng(0)
    base = np.where(rng.random(4000) < 0.1, rng.integers(0, 20, 4000), -1)
    better = np.where(rng.random(4000) < 0.1, 0, base)
    for spec, ranks in ((grid_sft, base), (tuned[1], better)):
        (spec.out / "best").mkdir()
        torch.save({"split": "valid", "ranks": {k: torch.as_tensor(ranks, dtype=torch.int8)
                                                for k in ("headline", "renorm/")}},
                   spec.out / "best" / "valid_ranks.pt")
    payload = tune_quality.main(["--stage", "sft", "--aggregate-only", "--root", str(root), "--results-dir",
                                 str(results), "--config-dir", str(CONFIGS / "beauty_cpu"), "--tag", "cpu"])
    assert (results / "tune_beauty_sft_cpu.json").is_file() and payload["stage"] == "sft"
    assert [r["setting"] for r in payload["references"]] == ["sft"]
    assert [r["setting"] for r in payload["runs"]] == [tuned[0].name, tuned[1].name]
    epochs = load_config(CONFIGS / "beauty_cpu" / "sft.yaml").epochs
    assert payload["selected"] == tuned[1].name and payload["budget"]["epochs"] == epochs
    assert (results / "tune_beauty_sft_cpu_runs" / tuned[1].name / "result.json").is_file()
    rows = {r["setting"]: r for r in payload["references"] + payload["runs"]}
    assert "paired" not in rows["sft"] and "paired" not in rows[tuned[0].name]  # itself; no ranks
    paired = rows[tuned[1].name]["paired"]["sft"]["ndcg@10"]
    def ndcg10(rank):
        return np.where((rank >= 0) & (rank < 10), 1 / np.log2(np.maximum(rank, 0) + 2), 0)
    gain = ndcg10(better) - ndcg10(base)
    assert paired["diff"] == pytest.approx(gain.mean()) and paired["ci95"][0] > 0 and paired["users"] == 4000
    assert (results / "tune_beauty_sft_cpu_runs" / tuned[1].name / "valid_ranks.npz").is_file()
    assert (results / "quality_beauty_cpu_runs" / "sft_seed42" / "valid_ranks.npz").is_file()
    assert "tune_beauty_cpu.json" in report.render_tuning_quality(results)  # stage 2's table: still pending
    text = report.render_tuning_quality(results, "sft")
    assert "ndcg@10 − sft [95% CI], p" in text
    assert f"{paired['diff']:+.4f} [{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}], p" in text
    assert f"beauty, SFT from scratch, seed 42: the grid's SFT ({epochs} epochs at batch 256" in text
    assert f"among the tuning rows: **{tuned[1].name}**" in text


def test_stage2_tuning_refuses_a_grid_sft_other_than_the_one_it_tuned_from(tmp_path):
    tune_quality = _benchmark("tune_quality")
    grid = runner.plan_grid("beauty", ["sft_continue"], [42], tmp_path, sft_seed=42)
    path = tmp_path / "tune_beauty_cpu.json"
    assert tune_quality.sft_checkpoint(grid, path) is None  # no SFT yet, nothing recorded
    (grid[0].out / "best").mkdir(parents=True)
    (grid[0].out / "best" / "model.safetensors").write_bytes(b"first sft")
    (grid[0].out / "result.json").write_text("{}")
    first = tune_quality.sft_checkpoint(grid, path)
    assert len(first) == 64
    path.write_text(json.dumps({"sft_checkpoint": first}))
    assert tune_quality.sft_checkpoint(grid, path) == first
    (grid[0].out / "best" / "model.safetensors").write_bytes(b"retrained sft")
    with pytest.raises(SystemExit, match=f"tuned from the SFT checkpoint {first[:12]}"):
        tune_quality.sft_checkpoint(grid, path)


def test_learning_rate_tuning_keeps_each_methods_best_rate_against_its_current_grid_run(tmp_path):
    """``tune_quality.py --stage lr``: per method, the best of its grid run (its YAML's rate) and its rate rows on
    validation; a grid run from another SFT checkpoint is no reference and is left out; the report names the pick
    per method."""
    from gflowgr_core.train.config import save_config

    tune_quality, report = _benchmark("tune_quality"), _benchmark("report")
    root, results = tmp_path / "runs", tmp_path / "results"
    grid = {s.method: s for s in runner.plan_grid("beauty", ["sft", "sft_continue", "sdpo", "gflowgr_tb"], [42],
                                                   root, config_dir=CONFIGS / "beauty_cpu", sft_seed=42)}
    tuned = {s.name: s for s in tune_quality.plan_tuning("beauty", root, list(tune_quality.LR_TUNING),
                                                          CONFIGS / "beauty_cpu", 42, [], tune_quality.LR_TUNING)}
    (grid["sft"].out / "best").mkdir(parents=True)
    (grid["sft"].out / "best" / "model.safetensors").write_bytes(b"the grid's sft")
    # "sft": the digest of the grid SFT's best/ once written (it is first); sdpo's grid run recorded another one.
    finished = [(grid["sft"], 0.0494, None), (grid["sft_continue"], 0.0479, "sft"), (grid["sdpo"], 0.0461, "0" * 64),
                (grid["gflowgr_tb"], 0.0511, "sft"), (tuned["sft_continue_lr1e-4"], 0.0490, "sft"),
                (tuned["sft_continue_lr2e-4"], 0.0485, "sft"), (tuned["gflowgr_tb_lr1e-4"], 0.0500, "sft")]
    rng = np.random.default_rng(0)
    digest = None
    for spec, best, start in finished:
        if start == "sft":
            digest = digest or tune_quality.checkpoint_digest(grid["sft"].out / "best")
            start = digest
        spec.out.mkdir(parents=True, exist_ok=True)
        _finish_tuning_run(spec, best)
        if start is not None:
            (spec.out / "env.json").write_text(json.dumps({"starts_from": [{"checkpoint": "best", "sha256": start}]}))
        (spec.out / "best").mkdir(exist_ok=True)  # the best epoch's per-user validation ranks, as the trainer keeps
        ranks = np.where(rng.random(2000) < best * 2, rng.integers(0, 20, 2000), -1)
        torch.save({"split": "valid", "ranks": {k: torch.as_tensor(ranks, dtype=torch.int8)
                                                for k in ("headline", "renorm/")}}, spec.out / "best" / "valid_ranks.pt")
    payload = tune_quality.main(["--stage", "lr", "--aggregate-only", "--root", str(root), "--results-dir",
                                 str(results), "--config-dir", str(CONFIGS / "beauty_cpu"), "--tag", "cpu"])
    assert (results / "tune_beauty_lr_cpu.json").is_file() and payload["stage"] == "lr"
    assert payload["sft_checkpoint"] == digest
    # sdpo's grid run started from another SFT: no reference; sdpo has no rate row either, so nothing is picked.
    assert [r["setting"] for r in payload["references"]] == ["sft", "sft_continue", "gflowgr_tb"]
    assert [r["setting"] for r in payload["runs"]] == ["sft_continue_lr1e-4", "gflowgr_tb_lr1e-4",
                                                      "sft_continue_lr2e-4"]
    assert payload["selected_by_method"] == {"gflowgr_tb": "gflowgr_tb", "sft_continue": "sft_continue_lr1e-4"}
    assert "selected" not in payload
    assert payload["budget"]["lr"] == load_config(CONFIGS / "beauty_cpu" / "sft_continue.yaml").lr
    rows = {r["setting"]: r for r in payload["references"] + payload["runs"]}
    assert rows["sft_continue_lr1e-4"]["overrides"] == ["lr=0.0001"] and rows["sft_continue_lr1e-4"]["lr"] == 0.0001
    assert rows["sft_continue"]["lr"] == payload["budget"]["lr"]
    assert set(rows["sft_continue_lr1e-4"]["paired"]) == {"gflowgr_tb", "sft_continue"}
    assert set(rows["gflowgr_tb"]["paired"]) == {"sft_continue"}
    text = report.render_tuning_quality(results, "lr")
    assert "| `sft_continue` | sft_continue_lr1e-4 | `lr=0.0001` | 0.0001 | 2 |" in text
    assert f"| grid run | `sft_continue` | sft_continue | the grid's run | {rows['sft_continue']['lr']:g} | 2 |" in text
    assert "per method, its YAML's own run included: `gflowgr_tb` **gflowgr_tb**; " \
           "`sft_continue` **sft_continue_lr1e-4**." in text
    assert "tune_beauty_lr_cpu.json" in report.render_tuning_quality(tmp_path / "none", "lr")  # pending
    # Once the grid's sft_continue is retrained at another rate, the table (the record of the choice) is kept.
    save_config(load_config(grid["sft_continue"].config_path, [*grid["sft_continue"].overrides, "lr=0.00033"]),
                grid["sft_continue"].out / "config.yaml")
    written = (results / "tune_beauty_lr_cpu.json").read_text()
    with pytest.raises(SystemExit, match=f"holds the grid's sft_continue at lr {rows['sft_continue']['lr']} as a "):
        tune_quality.main(["--stage", "lr", "--aggregate-only", "--root", str(root), "--results-dir", str(results),
                           "--config-dir", str(CONFIGS / "beauty_cpu"), "--tag", "cpu"])
    assert (results / "tune_beauty_lr_cpu.json").read_text() == written


def test_a_later_tuning_round_keeps_its_own_runs_and_competes_with_the_grid_run_of_the_yaml(tmp_path):
    """``tune_quality.py --round 2`` tunes from the grid's current SFT: its runs live apart from round 1's (a
    round-1 run of the same setting, from another SFT, is neither listed nor taken as finished), its table is
    ``..._round2.json``, and the grid's run of the YAML as it is stays selected unless a row beats it."""
    tune_quality, report = _benchmark("tune_quality"), _benchmark("report")
    root, results = tmp_path / "runs", tmp_path / "results"
    args = ["--aggregate-only", "--root", str(root), "--results-dir", str(results), "--config-dir",
            str(CONFIGS / "beauty_cpu"), "--tag", "cpu", "--round", "2"]
    grid = {s.method: s for s in runner.plan_grid("beauty", ["sft", "sft_continue", "gflowgr_tb"], [42], root,
                                                   config_dir=CONFIGS / "beauty_cpu", sft_seed=42)}
    first, = tune_quality.plan_tuning("beauty", root, ["teacher"], CONFIGS / "beauty_cpu", 42, [])
    second = {s.name: s for s in tune_quality.plan_tuning("beauty", root, ["teacher", "share0p5"],
                                                          CONFIGS / "beauty_cpu", 42, [], round_=2)}
    assert first.out == root / "beauty" / "tune" / "teacher" / "seed42"
    assert second["teacher"].out == root / "beauty" / "tune_round2" / "teacher" / "seed42"
    assert [o for o in second["teacher"].overrides if not o.startswith("out=")] == \
        [o for o in first.overrides if not o.startswith("out=")]
    for spec, best in ((grid["sft"], 0.0494), (grid["sft_continue"], 0.0491), (grid["gflowgr_tb"], 0.0511),
                       (first, 0.0530), (second["teacher"], 0.0505)):
        spec.out.mkdir(parents=True)
        _finish_tuning_run(spec, best)
    assert not second["share0p5"].done()
    payload = tune_quality.main(args)
    assert (results / "tune_beauty_cpu_round2.json").is_file() and payload["round"] == 2
    assert [r["setting"] for r in payload["runs"]] == ["teacher"]  # round 1's teacher (0.0530) is not in it
    assert payload["selected"] == "gflowgr_tb"  # the YAML's own run (0.0511) beats the round's row (0.0505)
    # The budget stated is the tuned method's (its rate may differ from the baselines' tuned rates).
    assert payload["budget"]["lr"] == load_config(CONFIGS / "beauty_cpu" / "gflowgr_tb.yaml").lr
    second["share0p5"].out.mkdir(parents=True)
    _finish_tuning_run(second["share0p5"], 0.0520)
    assert tune_quality.main(args)["selected"] == "share0p5"
    text = report.render_tuning_quality(results)
    assert "round 2" in text and "**share0p5**" in text
    with pytest.raises(SystemExit, match="--round must be 1 or more"):
        tune_quality.main([*args[:-1], "0"])


# Beauty CPU stage-2 methods without rate rows of their own run at the rate selected for their family.
RATE_FAMILY = {"dpo": "sdpo", "gflowgr_db": "gflowgr_tb", "gflowgr_subtb": "gflowgr_tb"}


def test_beauty_cpu_stage2_rates_are_the_ones_selected_on_validation():
    """Each Beauty CPU stage-2 YAML holds the learning rate its method (or its family's) scored best with on
    validation (``selected_by_method`` of ``tune_beauty_lr_cpu.json``, the grid's own rate included)."""
    tuned = json.loads((REPO / "benchmarks" / "results" / "tune_beauty_lr_cpu.json").read_text())
    rows = {r["setting"]: r for r in tuned["references"] + tuned["runs"]}
    for method, name in tuned["selected_by_method"].items():
        assert rows[name]["valid"]["ndcg@10"] == max(r["valid"]["ndcg@10"] for r in rows.values()
                                                      if r["method"] == method)
    picked = {method: rows[name]["lr"] for method, name in tuned["selected_by_method"].items()}
    assert set(picked) == {"sft_continue", "sdpo", "gflowgr_tb"}
    for method in METHODS[1:]:
        want = picked[RATE_FAMILY.get(method, method)]
        assert load_config(CONFIGS / "beauty_cpu" / f"{method}.yaml").lr == want, f"{method}.yaml: lr is not {want}"


def tuned_selected() -> set[str]:
    """The selected setting of each tuning stage, and each method's selected rate (the YAMLs hold them)."""
    rates = json.loads((REPO / "benchmarks" / "results" / "tune_beauty_lr_cpu.json").read_text())
    return {yaml_pick(stage)["selected"] for stage in TUNED_YAMLS} | set(rates["selected_by_method"].values())


@pytest.mark.parametrize("name", list(runner.ABLATIONS))
def test_ablation_overrides_apply(name):
    method, overrides = runner.ABLATIONS[name]
    base = load_config(CONFIGS / "beauty" / f"{method}.yaml")
    cfg = load_config(CONFIGS / "beauty" / f"{method}.yaml", overrides)
    assert (cfg == base) == (not overrides), f"{name}: overrides {overrides} did not change the config"
    for item in overrides:
        key, value = item.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert str(node).lower() == value.lower() or float(node) == float(value), f"{name}: {key} = {node}"


def test_ablations_cover_the_requested_axes():
    overrides = {tuple(o) for _, o in runner.ABLATIONS.values()}
    # The shipped configs run lambda_gfn = 0.1 (picked on validation): 1 and 10 are the overrides.
    assert runner.ABLATIONS["lambda_gfn=0.1"] == ("gflowgr_tb", [])
    for expected in (("gfn.lambda_gfn=1",), ("gfn.lambda_gfn=10",), ("gfn.n_aug=1",), ("gfn.n_aug=5",),
                     ("gfn.reward.use_a=false", "gfn.reward.r_pos_mode=fixed"), ("gfn.reward.use_cm=false",),
                     ("gfn.reward.use_sim=false",), ("gfn.reward.r_pos_mode=fixed", "gfn.reward.beta=1.0"),
                     ("gfn.sampler=logs",), ("gfn.sampler=random",), ("gfn.sampler=onpolicy",),
                     ("gfn.policy_support=vocab",)):
        assert expected in overrides
    assert {m for m, _ in runner.ABLATIONS.values()} == {"gflowgr_tb", "gflowgr_db", "gflowgr_subtb"}


def test_plan_grid_is_seed_major_and_wires_checkpoints(tmp_path):
    specs = runner.plan_grid("beauty", ["gflowgr_tb", "sdpo"], [42, 43], tmp_path)
    assert [(s.name, s.seed) for s in specs] == [("sft", 42), ("gflowgr_tb", 42), ("sdpo", 42),
                                                 ("sft", 43), ("gflowgr_tb", 43), ("sdpo", 43)]
    for spec in specs:
        cfg = load_config(spec.config_path, spec.overrides)
        assert cfg.seed == spec.seed and Path(cfg.out) == spec.out
        assert Path(cfg.data) == tmp_path / "data" / "beauty"
        if spec.name != "sft":
            assert Path(cfg.init_checkpoint) == tmp_path / "beauty" / "sft" / f"seed{spec.seed}" / "best"
            assert spec.needs == [tmp_path / "beauty" / "sft" / f"seed{spec.seed}"]
    quick = runner.plan_grid("beauty", ["gflowgr_tb"], [42], tmp_path, quick=True)
    cfg = load_config(quick[1].config_path, quick[1].overrides)
    assert cfg.model.hidden == 32 and cfg.max_steps == 10 and cfg.device == "cpu"
    assert str(quick[1].out).startswith(str(tmp_path / "quick"))


def test_plan_grid_one_sft_for_every_seed_and_a_config_dir(tmp_path):
    specs = runner.plan_grid("beauty", ["gflowgr_tb"], [42, 43], tmp_path, config_dir=CONFIGS / "beauty_cpu",
                             sft_seed=42)
    assert [(s.name, s.seed) for s in specs] == [("sft", 42), ("gflowgr_tb", 42), ("gflowgr_tb", 43)]
    for spec in specs:
        assert spec.config_path.parent == CONFIGS / "beauty_cpu"
        cfg = load_config(spec.config_path, spec.overrides)
        assert cfg.seed == spec.seed and cfg.likelihood_support == "level"
        if spec.name != "sft":
            assert Path(cfg.init_checkpoint) == tmp_path / "beauty" / "sft" / "seed42" / "best"
            assert spec.needs == [tmp_path / "beauty" / "sft" / "seed42"]
    assert runner.output_path("beauty", False, False, tmp_path, "cpu") == tmp_path / "quality_beauty_cpu.json"


def test_plan_grid_single_seed_methods_run_at_the_first_seed_only(tmp_path):
    specs = runner.plan_grid("beauty", ["sft_continue", "dpo", "gflowgr_db"], [42, 43, 44], tmp_path, sft_seed=42,
                             single_seed=["dpo", "gflowgr_db"])
    assert [(s.name, s.seed) for s in specs] == [
        ("sft", 42), ("sft_continue", 42), ("dpo", 42), ("gflowgr_db", 42), ("sft_continue", 43),
        ("sft_continue", 44)]
    with pytest.raises(SystemExit, match="gflowgr_subtb"):
        runner.plan_grid("beauty", ["dpo"], [42], tmp_path, single_seed=["gflowgr_subtb"])


def test_run_specs_resume_continues_from_last(tmp_path):
    specs = runner.plan_grid("beauty", ["gflowgr_tb"], [42], tmp_path)
    (specs[0].out).mkdir(parents=True)
    (specs[0].out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
    (specs[0].out / "best").mkdir()
    (specs[0].out / "best" / "model.safetensors").write_bytes(b"sft")
    (specs[1].out / "last").mkdir(parents=True)
    (specs[1].out / "last" / "state.pt").write_text("x")
    (specs[1].out / "env.json").write_text(json.dumps({"starts_from": runner.starts_from(specs[1])}))
    assert specs[1].status() == "resumable"
    seen = []

    def fake_train(config, data):
        seen.append(config.resume)
        assert (Path(config.out) / "last" / "state.pt").exists(), "a resumed run keeps its last/ checkpoint"
        (Path(config.out) / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
        return {}

    runner.run_specs(specs, data=None, train_fn=fake_train, resume=True)
    assert seen == [True]
    assert json.loads((specs[1].out / "env.json").read_text())["resumed"] is True


def test_a_resumable_run_whose_config_changed_starts_over_instead_of_resuming(tmp_path):
    """Resuming an interrupted run after its YAML changed would finish it with the old config: it is outdated
    (the grid stops, or with ``retrain_changed`` trains it again from scratch)."""
    from gflowgr_core.train.config import load_config, save_config

    specs = runner.plan_grid("beauty", ["sdpo"], [42], tmp_path)
    sft, sdpo = specs
    (sft.out / "best").mkdir(parents=True)
    (sft.out / "best" / "model.safetensors").write_bytes(b"sft")
    (sft.out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
    (sdpo.out / "last").mkdir(parents=True)
    (sdpo.out / "last" / "state.pt").write_text("x")
    (sdpo.out / "env.json").write_text(json.dumps({"starts_from": runner.starts_from(sdpo)}))
    save_config(load_config(sdpo.config_path, sdpo.overrides), sdpo.out / "config.yaml")
    assert runner._outdated(specs) == {}  # same config and start: resumed
    save_config(load_config(sdpo.config_path, [*sdpo.overrides, "lr=0.00033"]), sdpo.out / "config.yaml")
    assert sdpo.status() == "resumable" and sdpo.config_changes() == ["lr"]
    assert runner._outdated(specs) == {sdpo.out: "config changed (lr)"}
    seen = []

    def fake_train(config, data):
        seen.append(config.resume)
        assert not (Path(config.out) / "last").exists(), "the interrupted run's folder is cleared first"
        (Path(config.out) / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
        return {}

    with pytest.raises(SystemExit, match=r"sdpo/seed42: config changed \(lr\)"):
        runner.run_specs(specs, data=None, train_fn=fake_train, resume=True)
    runner.run_specs(specs, data=None, train_fn=fake_train, resume=True, retrain_changed=True)
    assert seen == [False]


def _fake_result(spec, value: float) -> dict:
    test = {m: value for m in runner.METRICS}
    return {"test": test, "train_seconds": 10.0 * value, "epochs": 2, "steps": 20, "device": "cpu"}


def test_run_specs_skips_finished_resumes_stale_and_respects_needs(tmp_path):
    specs = runner.plan_grid("beauty", ["gflowgr_tb"], [42, 43], tmp_path)
    trained = []

    def fake_train(config, data):
        out = Path(config.out)
        trained.append(out)
        assert not (out / "stale.txt").exists(), "an interrupted run folder must be cleared first"
        (out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
        return {}

    # seed 42 SFT finished earlier; seed 42 GFlowGR was interrupted (folder without result.json).
    specs[0].out.mkdir(parents=True)
    (specs[0].out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
    specs[1].out.mkdir(parents=True)
    (specs[1].out / "stale.txt").write_text("x")
    report = runner.run_specs(specs, data=None, train_fn=fake_train)
    assert trained == [specs[1].out, specs[2].out, specs[3].out]
    assert report["skipped"] == [str(specs[0].out)]
    assert all((s.out / "env.json").exists() for s in specs[1:])
    # A second pass trains nothing.
    trained.clear()
    report = runner.run_specs(specs, data=None, train_fn=fake_train)
    assert trained == [] and len(report["skipped"]) == 4


def test_run_specs_stops_on_a_finished_run_whose_config_changed_and_retrains_it_on_request(tmp_path):
    from gflowgr_core.train.config import load_config, save_config

    specs = runner.plan_grid("beauty", ["gflowgr_tb"], [42], tmp_path)
    sft, tb = specs
    for spec, lam in ((sft, None), (tb, 0.3)):  # both finished; GFlowGR with a lambda its YAML no longer holds
        spec.out.mkdir(parents=True)
        cfg = load_config(spec.config_path, spec.overrides + ([f"gfn.lambda_gfn={lam}"] if lam else []))
        # Where the run lived on its machine is not a change.
        save_config(dataclasses.replace(cfg, data="/elsewhere/data", evaluate_test=False), spec.out / "config.yaml")
        (spec.out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
    assert sft.config_changes() == [] and sft.status() == "done"
    assert tb.config_changes() == ["gfn.lambda_gfn"] and tb.status() == "changed"
    assert sft.ran_with() == [] and tb.ran_with() == ["gfn.lambda_gfn=0.3"]
    trained = []

    def fake_train(config, data):
        assert not (Path(config.out) / "result.json").exists(), "the outdated run's folder is cleared first"
        trained.append(Path(config.out))
        save_config(config, Path(config.out) / "config.yaml")
        (Path(config.out) / "result.json").write_text(json.dumps(_fake_result(None, 0.2)))
        return {}

    with pytest.raises(SystemExit, match=r"gflowgr_tb/seed42: config changed \(gfn.lambda_gfn\)"):
        runner.run_specs(specs, data=None, train_fn=fake_train)
    assert trained == []
    report = runner.run_specs(specs, data=None, train_fn=fake_train, retrain_changed=True)
    assert trained == [tb.out] and report["skipped"] == [str(sft.out)] and tb.status() == "done"
    # A retrained SFT makes every run that starts from it outdated too.
    save_config(load_config(sft.config_path, sft.overrides + ["lr=0.01"]), sft.out / "config.yaml")
    outdated = runner._outdated(specs)
    assert list(outdated) == [sft.out, tb.out] and "starts from" in outdated[tb.out]


def test_a_stage2_run_is_outdated_once_its_sft_checkpoint_is_another(tmp_path, capsys):
    """A new machine restores a stage-2 record from an earlier SFT beside the retrained SFT's record: the
    digest its env.json recorded when it started tells them apart."""
    specs = runner.plan_grid("beauty", ["sft_continue"], [42], tmp_path, sft_seed=42)
    sft, cont = specs
    (sft.out / "best").mkdir(parents=True)
    (sft.out / "best" / "model.safetensors").write_bytes(b"sft")
    (sft.out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))

    def fake_train(config, data):
        (Path(config.out) / "result.json").write_text(json.dumps(_fake_result(None, 0.2)))
        return {}

    runner.run_specs(specs, data=None, train_fn=fake_train)
    started = json.loads((cont.out / "env.json").read_text())["starts_from"]
    digest = _benchmark("quality_records").checkpoint_digest(sft.out / "best")
    assert started == [{"checkpoint": str(sft.out / "best"), "sha256": digest}]
    assert runner._outdated(specs) == {}
    (sft.out / "best" / "model.safetensors").write_bytes(b"another sft")
    assert "started from another checkpoint" in runner._outdated(specs)[cont.out]
    runner.main(["--dry-run", "--methods", "sft_continue", "--seeds", "42", "--sft-seed", "42", "--root", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"outdated: {cont.out}: started from another checkpoint" in printed
    row = next(line for line in printed.splitlines() if line.split()[:2] == ["sft_continue", "42"])
    assert row.split()[2] == "outdated"
    agg = runner.aggregate(specs, [42])  # not mixed into the results of the SFT now under it
    assert agg["missing"] == ["sft_continue"] and list(agg["outdated"]) == [str(cont.out)]
    (cont.out / "env.json").write_text("{}")  # a run that recorded no start
    assert "started from another checkpoint" in runner._outdated(specs)[cont.out]
    trained = []
    runner.run_specs(specs, data=None, train_fn=lambda c, d: trained.append(Path(c.out)) or fake_train(c, d),
                     retrain_changed=True)
    assert trained == [cont.out] and runner._outdated(specs) == {}


def test_run_specs_time_budget_and_missing_sft(tmp_path):
    specs = runner.plan_grid("beauty", ["gflowgr_tb"], [42], tmp_path)
    report = runner.run_specs(specs[1:], data=None, train_fn=lambda c, d: pytest.fail("must not train"))
    assert report["not_started"] == [str(specs[1].out)]  # its SFT checkpoint does not exist
    report = runner.run_specs(specs, data=None, max_minutes=-1, train_fn=lambda c, d: pytest.fail("no"))
    assert len(report["not_started"]) == 2


def test_aggregate_mean_std_and_missing(tmp_path):
    specs = runner.plan_grid("beauty", ["gflowgr_tb", "sdpo"], [42, 43, 44], tmp_path)
    values = {42: 0.02, 43: 0.03, 44: 0.04}
    for spec in specs:
        if spec.name == "sdpo":
            continue  # never ran
        if spec.name == "gflowgr_tb" and spec.seed == 44:
            continue  # not finished yet
        spec.out.mkdir(parents=True)
        (spec.out / "result.json").write_text(json.dumps(_fake_result(spec, values[spec.seed])))
        (spec.out / "env.json").write_text(json.dumps({"device": "NVIDIA H100", "versions": {"torch": "x"},
                                                       "starts_from": runner.starts_from(spec)}))
    agg = runner.aggregate(specs, [42, 43, 44])
    assert agg["device"] == "NVIDIA H100" and agg["seeds"] == [42, 43, 44]
    assert agg["missing"] == ["sdpo"] and set(agg["methods"]) == {"sft", "gflowgr_tb"}
    sft = agg["methods"]["sft"]
    assert sft["seeds_done"] == [42, 43, 44]
    assert math.isclose(sft["recall@10"]["mean"], 0.03) and math.isclose(sft["recall@10"]["std"], 0.01)
    assert math.isclose(sft["train_seconds"]["mean"], 0.3)
    tb = agg["methods"]["gflowgr_tb"]
    assert tb["seeds_done"] == [42, 43] and math.isclose(tb["ndcg@5"]["mean"], 0.025)
    assert math.isclose(tb["ndcg@5"]["std"], math.sqrt(2 * 0.005 ** 2))
    for metric in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "tail_share@10"):
        assert set(tb[metric]) == {"mean", "std"}
    assert agg["epochs"]["gflowgr_tb"] == [2, 2] and agg["steps"]["sft"] == [20, 20, 20]
    table = runner.quality_table(agg, runner.PAPER_BEAUTY)
    assert "0.0672" in table  # the paper's GFlowGR-TB recall@10 beside ours


def test_dry_run_trains_nothing(tmp_path, capsys):
    out = runner.main(["--dataset", "beauty", "--dry-run", "--root", str(tmp_path),
                       "--results-dir", str(tmp_path / "results")], train_fn=lambda c, d: pytest.fail("trained"))
    assert out == {}
    printed = capsys.readouterr().out
    assert "gflowgr train --config" in printed and "seed44" in printed
    assert not (tmp_path / "results").exists() and not (tmp_path / "beauty").exists()


@pytest.mark.skipif(not (BEAUTY / "Beauty.inter.json").exists(), reason=f"shared Beauty data not found at {BEAUTY}")
def test_quick_mode_end_to_end(tmp_path):
    """The real script on a 300-user Beauty slice: SFT then GFlowGR-TB, aggregate, rerun skips both."""
    argv = ["--dataset", "beauty", "--quick", "--methods", "gflowgr_tb", "--root", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "gfn.sampler=random", "max_steps=4", "max_train_examples=128",
            "valid_max_users=20"]
    agg = runner.main(argv)
    path = tmp_path / "results" / "quality_beauty_quick.json"
    saved = json.loads(path.read_text())
    assert saved["quick"] is True and saved["seeds"] == [42]
    assert set(saved["methods"]) == {"sft", "gflowgr_tb"}
    for entry in saved["methods"].values():
        for metric in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "tail_share@10"):
            assert 0.0 <= entry[metric]["mean"] <= 1.0 and entry[metric]["std"] == 0.0
        assert entry["train_seconds"]["mean"] > 0
    assert saved["steps"]["gflowgr_tb"] == [4]
    assert saved["paper"]["gflowgr_paper_letter_sids"]["gflowgr_tb"]["recall@10"] == 0.0672
    assert agg["methods"].keys() == saved["methods"].keys()
    again = runner.main(argv, train_fn=lambda c, d: pytest.fail("a finished run was trained again"))
    assert again["methods"] == saved["methods"]


def test_epoch_benchmark_rows_scale_partial_epochs_and_interleave_steps():
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokens = {"packed_processed": 100, "packed_real": 90, "per_prefix_processed": 500, "per_prefix_real": 200}
    whole = bench.epoch_row("sft", [1.0, 2.0, 3.0], True, 8, 3, tokens)
    part = bench.epoch_row("sft", [4.0, 6.0], False, 8, 3, tokens)
    assert whole["whole_epoch"] and whole["epoch_s"] == 6.0 and whole["tokens_processed_per_epoch"] == 100
    assert not part["whole_epoch"] and part["epoch_s"] == 15.0 and part["tokens_real_per_epoch"] == 200

    class Recorder:
        def __init__(self):
            self.rows = []

        def train_step(self, rows):
            self.rows.append(rows.tolist())

    trainers, beside = {True: Recorder(), False: Recorder()}, Recorder()
    orders = {True: torch.arange(6), False: torch.arange(6).flip(0)}
    times = bench.interleaved_steps(trainers, orders, 2, 3, 4, float("inf"), "t", lambda: None, beside=beside)
    assert [len(times[k]) for k in (True, False, "beside")] == [4, 4, 4]
    assert trainers[True].rows == beside.rows == [[0, 1], [2, 3], [4, 5], [0, 1]]  # the same batches, wrapped
    assert trainers[False].rows[0] == [5, 4]
    none_left = bench.interleaved_steps(trainers, orders, 2, 3, 2, 0.0, "t", lambda: None)
    assert len(none_left[False]) == 0  # the per-prefix budget is spent before its first step


def test_epoch_benchmark_counts_the_tokens_of_both_layouts(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from gflowgr_core.data.windows import window_order

    data = bench.synthetic_prepared(tmp_path / "data", n_users=40, n_items=60)
    model = {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 2, "intermediate": 32, "flow_hidden": 16}
    trainer = bench.make_trainer(tmp_path / "data", data, model, "sft", 32, "cpu", "float32", tmp_path / "run", None,
                                 ["packing=true"])
    order = window_order(trainer.train_index, trainer.windows, torch.Generator().manual_seed(0))
    one, four = (bench.epoch_tokens(trainer, order, 32, t) for t in (1, 4))
    for tokens in (one, four):
        assert 0 < tokens["packed_real"] <= tokens["packed_processed"] < tokens["per_prefix_processed"]
        assert tokens["per_prefix_real"] <= tokens["per_prefix_processed"]
    # Three more trajectories add their L-1 branch tokens per example to both layouts; packed, longer windows
    # also need more rows of pack_row_tokens, each repeating its part of the trunk.
    extra = 3 * len(order) * (trainer.policy.num_levels - 1)
    assert four["per_prefix_real"] - one["per_prefix_real"] == extra
    assert four["packed_real"] - one["packed_real"] >= extra


def test_train_step_summary_ratios():
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"model": "m", "method": "sft", "step_ms": 10.0, "min_ms": 8.0},
            {"model": "m", "method": "gflowgr_tb_random", "step_ms": 25.0, "min_ms": 12.0},
            {"model": "m", "method": "gflowgr_tb_cm_curriculum", "error": "out of memory"}]
    summary = bench.summarize(rows)
    assert summary["gflowgr_over_sft_step_time"] == {"m": 2.5}
    assert summary["gflowgr_over_sft_step_time_min"] == {"m": 1.5}
    assert summary["cm_curriculum_over_sft_step_time"] == {"m": None}


def test_compile_benchmark_summary_is_each_variant_over_eager():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_compile", REPO / "benchmarks" / "bench_compile.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.pop(0)
    rows = [{"method": "sft", "variant": "eager", "median_step_s": 2.0},
            {"method": "sft", "variant": "compiled", "median_step_s": 1.5},
            {"method": "sft", "variant": "compiled_cudagraphs", "error": "RuntimeError: no CUDA"}]
    assert bench.summarize(rows) == {"sft": {"compiled_over_eager": 0.75, "compiled_cudagraphs_over_eager": None}}


def test_a_finished_tuning_run_stands_in_for_the_grid_sft_and_its_dependents_retrain(tmp_path):
    from gflowgr_core.train.config import load_config, save_config

    specs = runner.plan_grid("beauty", ["sft_continue"], [42], tmp_path, sft_seed=42)
    sft, cont = specs
    for spec, extra in ((sft, ["lr=0.01"]), (cont, [])):  # both finished; SFT with an lr its YAML no longer holds
        spec.out.mkdir(parents=True)
        save_config(load_config(spec.config_path, spec.overrides + extra), spec.out / "config.yaml")
        (spec.out / "result.json").write_text(json.dumps(_fake_result(None, 0.1)))
    source = tmp_path / "tune" / "sft_x" / "seed42"
    (source / "last").mkdir(parents=True)
    (source / "last" / "trainer_state.pt").write_bytes(b"state")
    (source / "env.json").write_text(json.dumps({"device": "cpu"}))
    (source / "result.json").write_text(json.dumps(_fake_result(None, 0.3)))
    tuned = load_config(sft.config_path, sft.overrides)
    save_config(dataclasses.replace(tuned, out=str(source), evaluate_test=False, lr=0.02), source / "config.yaml")
    with pytest.raises(SystemExit, match=r"lr: 0\.02 there, 0\.002 planned"):
        runner.adopt_run(sft, source)
    assert sft.status() == "changed"  # nothing was touched
    save_config(dataclasses.replace(tuned, out=str(source), evaluate_test=False), source / "config.yaml")
    assert runner.adopt_run(sft, source)
    assert sft.status() == "resumable" and (sft.out / "last" / "trainer_state.pt").read_bytes() == b"state"
    assert json.loads((sft.out / "env.json").read_text()) == {"device": "cpu", "adopted_from": str(source)}
    assert (source / "result.json").exists()  # the source is left as it was
    assert not runner.adopt_run(sft, source)  # under way: resumed, not copied again
    # The stage-2 run started from the SFT being replaced: it is trained again after it.
    assert "starts from" in runner._outdated(specs)[cont.out]
    resumed = []

    def fake_train(config, data):
        resumed.append((Path(config.out), config.resume))
        save_config(config, Path(config.out) / "config.yaml")
        (Path(config.out) / "result.json").write_text(json.dumps(_fake_result(None, 0.2)))
        return {}

    runner.run_specs(specs, data=None, train_fn=fake_train, resume=True, retrain_changed=True)
    assert resumed == [(sft.out, True), (cont.out, False)]
    env = json.loads((sft.out / "env.json").read_text())
    assert env["resumed"] and env["earlier"]["adopted_from"] == str(source)
    with pytest.raises(SystemExit, match="not a finished run"):
        runner.adopt_run(runner.plan_grid("beauty", ["sft"], [43], tmp_path)[0], tmp_path / "nowhere")
