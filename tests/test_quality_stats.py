"""Paired statistics and committed run records of the quality grid (benchmarks/quality_stats.py,
benchmarks/quality_records.py, and their use in benchmarks/run_quality.py's aggregate)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gflowgr_core.metrics import hit_rank, ndcg_at_k, recall_at_k

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import quality_records  # noqa: E402
import quality_stats  # noqa: E402
from test_configs import runner  # noqa: E402  (benchmarks/run_quality.py, loaded once)


def _random_rankings(n: int, items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ranked = torch.stack([torch.randperm(items, generator=g)[:20] for _ in range(n)])
    ranked[torch.rand(n, 20, generator=g) < 0.05] = -1  # empty slots
    target = torch.randint(0, items, (n,), generator=g)
    return ranked, target


def test_per_user_metrics_average_to_the_reported_metrics():
    ranked, target = _random_rankings(500, 60, seed=0)
    rank = hit_rank(ranked, target).numpy()
    per_user = quality_stats.per_user_metrics({"headline": rank, "renorm/": rank})
    for k in (5, 10):
        assert per_user[f"recall@{k}"].mean() == pytest.approx(float(recall_at_k(ranked, target, k)), abs=1e-7)
        assert per_user[f"ndcg@{k}"].mean() == pytest.approx(float(ndcg_at_k(ranked, target, k)), abs=1e-6)
        assert np.array_equal(per_user[f"renorm/ndcg@{k}"], per_user[f"ndcg@{k}"])
    assert set(per_user) == set(quality_stats.STAT_METRICS)


def test_paired_bootstrap_no_difference_and_a_clear_one():
    rng = np.random.default_rng(0)
    a = rng.random(2000)
    same = quality_stats.paired_bootstrap(a, a.copy(), resamples=300)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p"] == 1.0
    better = quality_stats.paired_bootstrap(a + 0.05 + 0.01 * rng.standard_normal(2000), a, resamples=300)
    assert better["diff"] == pytest.approx(0.05, abs=0.002)
    assert better["ci95"][0] > 0 and better["p"] <= 1 / 301 + 1e-12
    noise = quality_stats.paired_bootstrap(a, rng.permutation(a), resamples=500)
    assert noise["ci95"][0] < 0 < noise["ci95"][1] and noise["p"] > 0.05
    with pytest.raises(ValueError, match="paired samples"):
        quality_stats.paired_bootstrap(a, a[:10])


def test_ranks_file_round_trip(tmp_path):
    ranks = {"headline": np.array([0, -1, 19, 3]), "renorm/": np.array([1, 2, -1, -1])}
    quality_stats.save_ranks(tmp_path / "r.npz", ranks)
    back = quality_stats.load_ranks(tmp_path / "r.npz")
    assert set(back) == set(ranks) and all(np.array_equal(back[k], ranks[k]) for k in ranks)


def _finished_run(out: Path, value: float, ranks: dict, with_best: bool = False, starts_from=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    test = {m: value for m in runner.METRICS}
    (out / "result.json").write_text(json.dumps({"test": test, "train_seconds": 1.0, "epochs": 1, "steps": 2,
                                                 "device": "cpu"}))
    (out / "env.json").write_text(json.dumps({"device": "cpu", "versions": {}, "starts_from": list(starts_from)}))
    torch.save({"split": "test", "ranks": {k: torch.as_tensor(v, dtype=torch.int8) for k, v in ranks.items()}},
               out / "test_ranks.pt")
    if with_best:
        (out / "best").mkdir()
        (out / "best" / "weights.bin").write_bytes(b"\x01" * 100)


def test_records_survive_a_new_machine_and_feed_the_comparisons(tmp_path):
    specs = runner.plan_grid("beauty", ["sft_continue", "gflowgr_tb"], [42, 43], tmp_path / "runs", sft_seed=42)
    records = tmp_path / "results" / "quality_beauty_cpu_runs"

    def record_of(spec):
        return records / f"{spec.name}_seed{spec.seed}"

    rng = np.random.default_rng(1)
    n = 3000
    base = np.where(rng.random(n) < 0.3, rng.integers(0, 20, n), -1)
    better = np.where(rng.random(n) < 0.15, rng.integers(0, 3, n), base)  # some users' hits move up
    for spec in specs:
        ranks = {"headline": better if spec.name == "gflowgr_tb" else base, "renorm/": base}
        _finished_run(spec.out, 0.1, ranks, with_best=spec.name == "sft", starts_from=runner.starts_from(spec))
    agg = runner.aggregate(specs, [42, 43], data=None, record_of=record_of)
    comp = agg["comparisons"]
    assert set(comp) == {"gflowgr_tb-sft", "gflowgr_tb-sft_continue"}
    ndcg = comp["gflowgr_tb-sft_continue"]["ndcg@10"]
    assert ndcg["diff"] > 0 and ndcg["ci95"][0] > 0 and ndcg["p"] < 0.01 and ndcg["users"] == n
    assert comp["gflowgr_tb-sft_continue"]["renorm/ndcg@10"]["diff"] == 0.0
    assert (record_of(specs[0]) / "best" / "weights.bin").exists()  # only SFT keeps its checkpoint
    assert not (record_of(specs[1]) / "best").exists()

    # A new machine: the run folders are gone, the records are committed.
    import shutil
    shutil.rmtree(tmp_path / "runs")
    for spec in specs:
        assert quality_records.restore_run(spec.out, record_of(spec))
    assert all(spec.done() for spec in specs)
    assert (specs[0].out / "best" / "weights.bin").read_bytes() == b"\x01" * 100
    again = runner.aggregate(specs, [42, 43], data=None, record_of=record_of)
    assert again["comparisons"] == comp

    # A damaged committed checkpoint is refused, not silently used.
    shutil.rmtree(tmp_path / "runs")
    (record_of(specs[0]) / "best" / "weights.bin").write_bytes(b"\x02" * 100)
    with pytest.raises(SystemExit, match="do not match"):
        quality_records.restore_run(specs[0].out, record_of(specs[0]))


def test_a_record_never_replaces_a_run_being_retrained(tmp_path):
    """A record is restored only where its run folder is missing (a new machine). A finished run retrained
    under a new config keeps its folder: stopped with its session, its resumable ``last/``; still training in
    another process, the files it has written so far (its first ``last/`` comes at the end of an epoch)."""
    import shutil

    out, record = tmp_path / "runs" / "sft" / "seed42", tmp_path / "rec"
    _finished_run(record, 0.1, {"headline": np.zeros(4, dtype=int)}, with_best=True)
    (record / "best.sha256").write_text(json.dumps(quality_records._manifest(record / "best")))
    (out / "last").mkdir(parents=True)
    (out / "last" / "trainer_state.pt").write_bytes(b"step 2027")
    assert not quality_records.restore_run(out, record)
    assert (out / "last" / "trainer_state.pt").read_bytes() == b"step 2027" and not (out / "result.json").exists()
    shutil.rmtree(out / "last")
    (out / "config.yaml").write_text("stage: sft\n")  # a run in its first epoch
    assert not quality_records.restore_run(out, record)
    assert list(out.iterdir()) == [out / "config.yaml"]
    shutil.rmtree(out)
    assert quality_records.restore_run(out, record) and (out / "result.json").exists()


def test_a_retrained_run_s_record_holds_its_own_ranks_not_the_earlier_run_s(tmp_path):
    out, record = tmp_path / "runs" / "sdpo" / "seed42", tmp_path / "rec"
    _finished_run(out, 0.1, {"headline": np.full(6, 3)})
    quality_records.archive_run(out, record, keep_checkpoint=False)
    assert quality_records.run_ranks(out, record)["headline"].tolist() == [3] * 6
    _finished_run(out, 0.2, {"headline": np.full(6, 7)})  # trained again (a new SFT under it)
    quality_records.archive_run(out, record, keep_checkpoint=False)
    assert quality_records.load_ranks(record / "ranks.npz")["headline"].tolist() == [7] * 6  # kept at once
    assert quality_records.run_ranks(out, record)["headline"].tolist() == [7] * 6
    assert quality_records.load_ranks(record / "ranks.npz")["headline"].tolist() == [7] * 6


def test_a_run_without_ranks_is_left_out_of_the_comparisons(tmp_path):
    specs = runner.plan_grid("beauty", ["sdpo", "gflowgr_tb"], [42], tmp_path / "runs")
    for spec in specs:
        _finished_run(spec.out, 0.1, {"headline": np.zeros(10, dtype=int), "renorm/": np.zeros(10, dtype=int)},
                      starts_from=runner.starts_from(spec),
                      with_best=spec.name == "sft")
    (specs[1].out / "test_ranks.pt").unlink()  # sdpo: neither ranks nor a checkpoint
    agg = runner.aggregate(specs, [42], data=None, record_of=lambda s: tmp_path / "rec" / f"{s.name}")
    assert set(agg["comparisons"]) == {"gflowgr_tb-sft"}


def test_a_protocol_is_compared_with_the_same_method_of_another_on_the_seeds_both_finished(tmp_path):
    """--paired-with: the trie-support pair against the headline grid, from the two files' committed records."""
    rng = np.random.default_rng(5)
    n = 2500
    base = np.where(rng.random(n) < 0.3, rng.integers(0, 20, n), -1)
    worse = np.where(rng.random(n) < 0.2, -1, base)  # some users' hits lost

    def protocol(tag: str, methods: list, seeds: list, ranks: np.ndarray) -> tuple[Path, dict]:
        path = tmp_path / "results" / f"quality_beauty_{tag}.json"
        specs = runner.plan_grid("beauty", methods, seeds, tmp_path / tag, sft_seed=seeds[0])
        for spec in specs:
            _finished_run(spec.out, 0.1, {"headline": base, "renorm/": ranks}, with_best=spec.name == "sft",
                          starts_from=runner.starts_from(spec))
        agg = runner.aggregate(specs, seeds, data=None,
                               record_of=lambda s: quality_records.records_root(path) / f"{s.name}_seed{s.seed}")
        path.write_text(json.dumps(agg))
        return path, agg

    grid, _ = protocol("cpu", ["sft_continue", "gflowgr_tb"], [42, 43], base)
    pair, agg = protocol("cpu_trie", ["sft_continue", "sdpo"], [42], worse)
    out = runner.protocol_comparisons(pair, agg, grid)
    assert out["against"] == "quality_beauty_cpu.json"
    # sdpo has no run in the grid; sft and sft_continue are paired on seed 42, the one both finished.
    assert set(out["comparisons"]) == {"sft (quality_beauty_cpu_trie)-sft (quality_beauty_cpu)",
                                       "sft_continue (quality_beauty_cpu_trie)-sft_continue (quality_beauty_cpu)"}
    c = out["comparisons"]["sft_continue (quality_beauty_cpu_trie)-sft_continue (quality_beauty_cpu)"]
    assert c["ndcg@10"]["diff"] == 0.0 and c["ndcg@10"]["users"] == n
    assert c["renorm/ndcg@10"]["diff"] < 0 and c["renorm/ndcg@10"]["ci95"][1] < 0
    expected = (quality_stats.per_user_metrics({"renorm/": worse})["renorm/recall@10"].mean()
                - quality_stats.per_user_metrics({"renorm/": base})["renorm/recall@10"].mean())
    assert c["renorm/recall@10"]["diff"] == pytest.approx(expected)

    (quality_records.records_root(grid) / "sft_continue_seed42" / "ranks.npz").unlink()
    assert set(runner.protocol_comparisons(pair, agg, grid)["comparisons"]) == {
        "sft (quality_beauty_cpu_trie)-sft (quality_beauty_cpu)"}
    with pytest.raises(SystemExit, match="no such results file"):
        runner.protocol_comparisons(pair, agg, tmp_path / "missing.json")


def test_mean_intervals_bracket_each_methods_mean_and_narrow_with_more_users():
    rng = np.random.default_rng(3)
    small = {"a": {"recall@10": (rng.random(200) < 0.1).astype(float)}}
    large = {"a": {"recall@10": (rng.random(20000) < 0.1).astype(float)}}
    lo_s, hi_s = quality_stats.mean_intervals(small, metrics=["recall@10"], resamples=500)["a"]["recall@10"]
    lo_l, hi_l = quality_stats.mean_intervals(large, metrics=["recall@10"], resamples=500)["a"]["recall@10"]
    assert lo_s < small["a"]["recall@10"].mean() < hi_s
    assert lo_l < large["a"]["recall@10"].mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # 100x the users: ~10x narrower
