"""benchmarks/report.py: the documentation's tables are the committed JSON, rendered with the sizes, device
and commit each file records; --check fails on a stale table; the benchmark summaries carry their sizes."""
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    report = importlib.import_module("report")
    bench_decode = importlib.import_module("bench_decode")
finally:
    sys.path.pop(0)

HEADER = {"device": "CPU: Test CPU (2 logical cores)", "device_kind": "cpu", "load_average": [0.5, 0.4, 0.3],
          "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "triton": "3.8.0", "transformers": "5.24.0",
                       "git_commit": "abc1234", "git_uncommitted": []}}


def test_repository_tables_match_the_committed_json():
    """Every generated section of README.md and docs/*.md is what the committed results files give."""
    assert report.main(["--check"]) == 0, "run: python benchmarks/report.py"


def decode_payload(users=8, beams=5, kernel_users=32, speed=331.0, named_auto_speed=None) -> dict:
    """A decode results file as bench_decode.py writes it (its own summarise), at the given sizes;
    ``named_auto_speed``: also a row ``ours[cpp]`` (the backend ``auto`` chose, timed by name)."""
    named = [] if named_auto_speed is None else [("ours[cpp]", named_auto_speed)]
    e2e = [{"part": "end_to_end", "method": m, "users": users, "batch": users, "beams": beams,
            "users_per_s": ups, "median_ms": users / ups * 1e3, "reps": 2}
           for m, ups in (("ours[auto]", speed), *named, ("ours[torch]", 210.0), ("ours_unconstrained", 356.0),
                          ("hf_constrained", 113.0), ("hf_unconstrained", 114.0))]
    kernel = [{"part": "kernel", "catalogue": "beauty_12k", "items": 12101, "level": lvl, "mode": mode,
               "backend": b, "rows": kernel_users * beams, "users": kernel_users, "beams": beams, "d": 128,
               "dtype": "float32", "us_per_step": us, "reps": 3}
              for lvl in range(4) for mode in ("beam", "sample") for b, us in (("torch", 750.0), ("cpp", 158.0))]
    extra = {"workload": "letter/Beauty (22363 test users)", "items": 12101, "model_params": 1314432,
             "auto_backend": "cpp", "vocab": 1028, "dtype": "float32", "hf_valid_sid_share": 1.0}
    return {**HEADER, "config": {"quick": True, "history": 20, "hidden": 128, "layers": 4,
                                 "codes_per_level": [256] * 4, "workload": extra["workload"]},
            "rows": e2e + kernel, "summary": bench_decode.summarise(e2e + kernel, extra)}


def make_root(tmp_path: Path, readme: str, results: dict) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(readme)
    for name, payload in results.items():
        (tmp_path / "benchmarks" / "results" / name).write_text(json.dumps(payload))
    return tmp_path


def rendered_section(folder: Path, name: str, results: dict) -> str:
    """The README of a new root under ``folder`` holding only section ``name``, rendered from ``results``."""
    folder.mkdir()
    root = make_root(folder, f"<!-- report:{name} -->\n<!-- /report:{name} -->\n", results)
    assert report.main(["--root", str(root)]) == 0
    return (root / "README.md").read_text()


def test_summary_entries_carry_the_sizes_run():
    summary = decode_payload(users=8, beams=5, kernel_users=32)["summary"]
    assert summary["kernel_step"]["rows"] == 160 and summary["kernel_step"]["beams"] == 5
    assert summary["end_to_end"]["users"] == 8 and summary["end_to_end"]["beams"] == 5
    assert summary["kernel_step"]["us_per_step"]["beam"]["beauty_12k"] == {"torch": 750.0, "cpp": 158.0}
    assert not any(ch.isdigit() for key in summary for ch in key), "no size fixed in a key name"


def test_rewrite_fills_sections_from_the_json_and_check_sees_a_stale_table(tmp_path):
    readme = "# x\n\nintro\n<!-- report:decode -->\nold text\n<!-- /report:decode -->\ntail\n"
    root = make_root(tmp_path, readme, {"decode_quick.json": decode_payload()})
    (root / "docs" / "guide.md").write_text("<!-- report:decode -->\n<!-- /report:decode -->\n")
    assert report.main(["--check", "--root", str(root)]) == 1
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert text.startswith("# x\n\nintro\n<!-- report:decode -->\n")
    assert text.endswith("<!-- /report:decode -->\ntail\n")
    assert "old text" not in text
    section = text[text.index("<!-- report:decode -->"):]
    # The sizes, device and commit the file records, and the one run's figures.
    for expected in ("CPU: Test CPU (2 logical cores)", "commit `abc1234`", "torch 2.13.0+cpu", "beam 5",
                     "160 rows (32 users × 5 beams)", "| `ours[auto]` | 8 | 8 | 5 | 2 |", "12,101 items",
                     "**2.93×**", "1.31M parameters",
                     "pending: full sizes on a GPU, run `bash benchmarks/gpu_check.sh`"):
        assert expected in section, expected
    assert "5,120" not in section and "beam 20" not in section
    assert (root / "docs" / "guide.md").read_text().count("commit `abc1234`") == 1
    assert report.main(["--check", "--root", str(root)]) == 0
    # A new run with other figures makes the committed table stale.
    (root / "benchmarks" / "results" / "decode_quick.json").write_text(json.dumps(decode_payload(speed=300.0)))
    assert report.main(["--check", "--root", str(root)]) == 1
    assert (root / "README.md").read_text() == text, "--check writes nothing"


def test_decode_quotes_both_timings_of_the_auto_code_path_and_their_median(tmp_path):
    # auto ran cpp: `ours[auto]` and `ours[cpp]` are one code path timed twice, so neither alone is the figure.
    text = rendered_section(tmp_path / "both", "decode", {"decode_quick.json": decode_payload(speed=400.0,
                                                                                              named_auto_speed=264.0)})
    assert ("over HF `generate(prefix_allowed_tokens_fn)` in users/s: **2.94×** (median of `ours[auto]` 3.54× and "
            "`ours[cpp]` 2.34×: the same code path timed twice in this run") in text
    assert "**3.54×**" not in text
    # Without a row of the chosen backend there is one figure to quote.
    text = rendered_section(tmp_path / "one", "decode", {"decode_quick.json": decode_payload(speed=400.0)})
    assert "in users/s: **3.54×**;" in text and "median of `ours" not in text


def test_section_option_rewrites_only_the_named_sections(tmp_path):
    readme = ("<!-- report:decode -->\nold decode\n<!-- /report:decode -->\n"
              "<!-- report:demo -->\nold demo\n<!-- /report:demo -->\n")
    root = make_root(tmp_path, readme, {"decode_quick.json": decode_payload()})
    assert report.main(["--check", "--root", str(root), "--section", "decode"]) == 1
    assert report.main(["--root", str(root), "--section", "decode"]) == 0
    text = (root / "README.md").read_text()
    assert "old decode" not in text and "**2.93×**" in text
    assert "<!-- report:demo -->\nold demo\n<!-- /report:demo -->\n" in text, "other sections stay as they are"
    assert report.main(["--check", "--root", str(root), "--section", "decode"]) == 0
    assert report.main(["--check", "--root", str(root)]) == 1, "the demo section is still stale"
    with pytest.raises(SystemExit):
        report.main(["--root", str(root), "--section", "nope"])


def test_uncommitted_changes_and_interpreter_are_named(tmp_path):
    payload = decode_payload()
    payload["versions"] = {**payload["versions"], "git_uncommitted": ["gflowgr_core/x.py"], "triton_interpret": "1"}
    root = make_root(tmp_path, "<!-- report:decode -->\n<!-- /report:decode -->\n", {"decode_quick.json": payload})
    report.main(["--root", str(root)])
    text = (root / "README.md").read_text()
    assert "commit `abc1234` with uncommitted changes to gflowgr_core/x.py" in text
    assert "`TRITON_INTERPRET=1`" in text


def test_absent_results_are_pending(tmp_path):
    readme = "".join(f"<!-- report:{n} -->\n<!-- /report:{n} -->\n" for n in report.SECTIONS)
    root = make_root(tmp_path, readme, {})
    (root / "configs" / "beauty").mkdir(parents=True)
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    for stem in ("decode", "hf_processor", "gfn_loss", "train_step"):
        assert f"`benchmarks/results/{stem}.json`: pending: full sizes on a GPU, run `bash benchmarks/gpu_check.sh`." \
               in text
    assert ("`benchmarks/results/quality_beauty.json`: pending: run "
            "`python benchmarks/run_quality.py --dataset beauty`") in text
    assert "Demo result: pending" in text


def test_demo_table_is_keyed_by_what_the_file_holds(tmp_path):
    demo = {**HEADER, "wall_seconds": 287.6, "data": "MovieLens-100K, training subset: 8000 seeded random examples",
            "rows": [{"method": "sft", "recall@10": 0.1113, "ndcg@10": 0.0535, "renorm/recall@10": 0.12,
                      "train_seconds": 120.5},
                     {"method": "gflowgr_tb", "recall@10": 0.1082, "ndcg@10": 0.0520, "renorm/recall@10": 0.11,
                      "train_seconds": 95.0}]}
    root = make_root(tmp_path, "<!-- report:demo -->\n<!-- /report:demo -->\n", {"demo_cpu.json": demo})
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "| method | recall@10 | ndcg@10 | train_seconds |" in text
    assert "| `sft` | 0.1113 | 0.0535 | 120 |" in text and "| `gflowgr_tb` | 0.1082 | 0.0520 | 95.0 |" in text
    assert "Scoring `renorm/`:\n\n| method | recall@10 |\n|---|---|\n| `sft` | 0.1200 |" in text
    assert "4 min 48 s wall" in text and "training subset: 8000 seeded random examples" in text
    assert "commit `abc1234`" in text and "CPU: Test CPU" in text
    bad = {**demo, "rows": [{"recall@10": 0.1}]}
    (root / "benchmarks" / "results" / "demo_cpu.json").write_text(json.dumps(bad))
    with pytest.raises(report.ReportError, match=r"demo_cpu.json: rows\[0\] has no 'method'"):
        report.render_demo(root / "benchmarks" / "results")


def test_pending_quality_files_name_the_command_that_writes_them(tmp_path):
    root = make_root(tmp_path, "<!-- report:quality -->\n<!-- /report:quality -->\n", {})
    for ds in ("beauty", "beauty_cpu", "toys"):
        (root / "configs" / ds).mkdir(parents=True)
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert ("`benchmarks/results/quality_beauty_cpu.json`: pending: run `python benchmarks/run_quality.py --dataset "
            "beauty --config-dir configs/beauty_cpu --tag cpu` on a CPU.") in text
    assert ("`benchmarks/results/quality_toys.json`: pending: run `python benchmarks/run_quality.py --dataset toys` "
            "on a GPU.") in text
    # The output path run_quality.py writes for that command is the file the section waits for.
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        run_quality = importlib.import_module("run_quality")
    finally:
        sys.path.pop(0)
    assert run_quality.output_path("beauty", False, False, Path("r"), "cpu") == Path("r") / "quality_beauty_cpu.json"


def test_train_epoch_and_quality_files_render_what_they_hold(tmp_path):
    epoch = {**HEADER, "dtype": "bfloat16", "data": "Beauty", "num_train_examples": 131413, "model": "qwen2_1.3M",
             "row_tokens": 256,
             "rows": [{"method": "sft", "packing": True, "batch": 1024, "epoch_s": 1.5},
                      {"method": "sft", "packing": False, "batch": 1024, "epoch_s": 9.0}],
             "eval": [{"sort_by_length": True, "users": 2000, "users_per_s": 900.0}],
             "summary": {"sft_epoch_speedup_packed_vs_per_prefix": 6.0}}
    quality = {**HEADER, "seeds": [42, 43], "steps": {"sft": [100, 110]}, "quick": False,
               "methods": {"sft": {"recall@10": {"mean": 0.05, "std": 0.002}, "renorm/recall@10": {"mean": 0.06},
                                   "seeds_done": [42, 43]}},
               "reference": {"sasrec": {"recall@10": {"mean": 0.04, "std": 0.0}}},
               "comparisons": {"gflowgr_tb-sft": {"ndcg@10": {"diff": 0.0021, "ci95": [0.0004, 0.0039], "p": 0.012,
                                                              "users": 22363, "resamples": 2000}}},
               "protocol_comparisons": {"against": "quality_beauty_cpu.json", "comparisons": {
                   "sft (quality_beauty)-sft (quality_beauty_cpu)": {"renorm/ndcg@10": {
                       "diff": -0.0063, "ci95": [-0.0081, -0.0045], "p": 0.0005, "users": 22363,
                       "resamples": 2000}}}}}
    root = make_root(tmp_path, "<!-- report:train_epoch -->\n<!-- /report:train_epoch -->\n"
                               "<!-- report:quality -->\n<!-- /report:quality -->\n",
                     {"train_epoch_cuda.json": epoch, "quality_beauty.json": quality})
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "| method | packing | batch | epoch_s |" in text and "| sft | yes | 1,024 | 1.50 |" in text
    assert "`sft_epoch_speedup_packed_vs_per_prefix`: 6.00" in text and "131,413 training examples" in text
    assert "pending" not in text.split("report:quality")[0]
    assert "| `sft` | 0.0500 ± 0.0020 | 42, 43 |" in text and "| `sasrec (reference)` | 0.0400 |" in text
    assert "Scoring `renorm/`:" in text and "optimisation steps per seed: sft 100/110" in text
    assert "Paired bootstrap over 22,363 test users (2,000 resamples" in text
    assert "| `gflowgr_tb-sft` | ndcg@10 | +0.0021 | [+0.0004, +0.0039] | 0.012 |" in text
    assert "What it shows: `gflowgr_tb` vs `sft`: above it on ndcg@10 (+0.0021, p = 0.012)." in text
    assert "Against `quality_beauty_cpu.json` (each method minus the same method of that protocol" in text
    assert ("| `sft (quality_beauty)-sft (quality_beauty_cpu)` | renorm/ndcg@10 | -0.0063 | [-0.0081, -0.0045] "
            "| 0.0005 |") in text
    assert ("`sft (quality_beauty)` vs `sft (quality_beauty_cpu)`: below it on renorm/ndcg@10 (-0.0063, "
            "p = 0.0005).") in text


def test_the_verdict_says_below_and_not_distinguishable_from_the_interval():
    c = {"gflowgr_tb-sdpo": {"ndcg@10": {"diff": -0.002, "ci95": [-0.003, -0.001], "p": 0.001},
                             "renorm/ndcg@10": {"diff": 0.001, "ci95": [-0.0005, 0.0025], "p": 0.2}}}
    assert report.comparisons_verdict(c) == ("What it shows: `gflowgr_tb` vs `sdpo`: below it on ndcg@10 (-0.0020, "
                                             "p = 0.001); not distinguishable from it on renorm/ndcg@10 (+0.0010, "
                                             "p = 0.2).")


def test_train_compile_file_renders_every_variant_and_a_failed_one(tmp_path):
    rows = [{"method": "sft", "variant": "eager", "batch": 1024, "pack_rows": None, "compile_mode": "eager",
             "first_step_s": 2.0, "median_step_s": 1.5, "reps": 20},
            {"method": "sft", "variant": "compiled", "batch": 1024, "pack_rows": 78, "compile_mode": "default",
             "first_step_s": 60.0, "median_step_s": 1.2, "reps": 20},
            {"method": "sft", "variant": "compiled_cudagraphs", "batch": 1024, "pack_rows": 78,
             "compile_mode": "reduce-overhead", "reps": 20, "error": "RuntimeError: no graphs"}]
    payload = {**HEADER, "dtype": "float32", "data": "Beauty", "model": "qwen2_1.3M", "rows": rows,
               "summary": {"sft": {"compiled_over_eager": 0.8, "compiled_cudagraphs_over_eager": None}}}
    text = render_compile_section(tmp_path, payload)
    assert "`benchmarks/results/train_compile_cuda.json`: pending: on a GPU" in text
    assert "| method | variant | batch | pack_rows | compile_mode | reps | first_step_s | median_step_s | error |" in text
    assert "| sft | compiled | 1,024 | 78 | default | 20 | 60.0 | 1.20 | – |" in text
    assert "RuntimeError: no graphs" in text and "sft `compiled_over_eager`: 0.8000" in text



def render_compile_section(folder: Path, payload: dict) -> str:
    """The README's train_compile section rendered from ``payload`` as ``train_compile_cpu.json`` in ``folder``."""
    folder.mkdir(exist_ok=True)
    root = make_root(folder, "<!-- report:train_compile -->\n<!-- /report:train_compile -->\n",
                     {"train_compile_cpu.json": payload})
    assert report.main(["--root", str(root)]) == 0
    return (root / "README.md").read_text()


def test_train_compile_file_shows_the_forward_and_marks_a_partial_run(tmp_path):
    rows = [{"method": "sft", "variant": "eager", "batch": 1024, "pack_rows": None, "compile_mode": "eager",
             "forward": "block_sparse", "first_step_s": 2.0, "median_step_s": 1.5, "reps": 20},
            {"method": "sft", "variant": "eager_dense", "batch": 1024, "pack_rows": None, "compile_mode": "eager",
             "forward": "dense", "first_step_s": 2.0, "median_step_s": 1.8, "reps": 20}]
    payload = {**HEADER, "dtype": "float32", "data": "Beauty", "model": "qwen2_1.3M", "rows": rows,
               "complete": False, "summary": {"sft": {"eager_dense_over_eager": 1.2}}}
    text = render_compile_section(tmp_path / "partial", payload)
    assert "| sft | eager_dense | 1,024 | – | eager | dense | 20 | 2.00 | 1.80 |" in text
    assert "**partial**: stopped before every method ran" in text
    assert "partial" not in render_compile_section(tmp_path / "complete", {**payload, "complete": True})


def test_cpu_memory_section_renders_both_settings_or_says_how_to_run_it(tmp_path):
    assert "pending: run `python benchmarks/bench_cpu_memory.py`" in rendered_section(tmp_path / "none", "cpu_memory",
                                                                                      {})
    rows = [{"method": "sft_packed", "retain_cpu_memory": False, "batch": 1024, "steps": 10, "median_step_s": 2.0,
             "minor_faults_per_step": 120000.0},
            {"method": "sft_packed", "retain_cpu_memory": True, "batch": 1024, "steps": 10, "median_step_s": 1.5,
             "minor_faults_per_step": 80.0}]
    payload = {**HEADER, "dtype": "float32", "data": "Beauty", "model": "qwen2_1.3M", "rounds": 2,
               "steps_per_worker": 5, "rows": rows, "summary": {"sft_packed_retain_over_release": 0.75}}
    text = rendered_section(tmp_path / "one", "cpu_memory", {"cpu_memory_cpu.json": payload})
    assert "| sft_packed | no | 1,024 | 10 | 2.00 | 120,000 |" in text
    assert "| sft_packed | yes | 1,024 | 10 | 1.50 | 80.0 |" in text
    assert "2 rounds of one worker per setting, 5 timed steps each" in text
    assert "`sft_packed_retain_over_release`: 0.7500" in text


def test_marker_errors_name_the_file_and_line():
    with pytest.raises(report.ReportError, match=r"README.md:3: unknown report section 'nope'"):
        report.rewrite("a\nb\n<!-- report:nope -->\n<!-- /report:nope -->\n", "README.md", lambda n: "")
    with pytest.raises(report.ReportError, match=r"docs/x.md:1: section 'demo' has no closing"):
        report.rewrite("<!-- report:demo -->\ntext\n", "docs/x.md", lambda n: "")
    with pytest.raises(report.ReportError, match=r"docs/x.md:2: closing marker of 'demo' without its opening"):
        report.rewrite("text\n<!-- /report:demo -->\n", "docs/x.md", lambda n: "")


def test_a_results_file_from_an_older_script_is_named(tmp_path):
    old = decode_payload()
    old["summary"] = {"kernel_us_per_step_5120_rows": {}}
    root = make_root(tmp_path, "<!-- report:decode -->\n<!-- /report:decode -->\n", {"decode_quick.json": old})
    assert report.main(["--root", str(root)]) == 2
    with pytest.raises(report.ReportError, match=r"decode_quick.json: no 'summary.end_to_end'"):
        report.render_decode(root / "benchmarks" / "results")


def test_numbers():
    assert [report.num(x) for x in (331.257, 24.15, 0.09979, 1.0766, 12101, 1756.4, None, True)] == \
        ["331", "24.1", "0.0998", "1.08", "12,101", "1,756", "–", "yes"]
    assert report.times(2.9236) == "2.92×" and report.params(1314432) == "1.31M"
    assert report.metric(0.05) == "0.0500" and report.metric(4.567) == "4.57"


def test_tuning_file_renders_every_run_and_names_a_bad_row(tmp_path):
    valid = {"ndcg@10": 0.0617, "recall@10": 0.12, "renorm/ndcg@10": 0.07, "renorm/recall@10": 0.14,
             "coverage@10": 0.15}
    tuning = {**HEADER, "sizes": {"dataset": "MovieLens-100K", "valid_users": 943, "beams": 20,
                                  "stage2_train_examples": 8000, "stage2_epochs": 1, "batch_size": 128,
                                  "start": "runs/demo/sft/best"},
              "demo_gflowgr_tb": {"gfn.n_aug": 3},
              "runs": [{"round": "reference", "factor": "-", "stage": "sft_continue", "setting": "demo settings",
                        "valid": valid},
                       {"round": "1", "factor": "lambda_gfn", "stage": "gflowgr_tb", "setting": "gfn.lambda_gfn=0.1",
                        "valid": {**valid, "ndcg@10": 0.0620}}]}
    root = make_root(tmp_path, "<!-- report:tuning -->\n<!-- /report:tuning -->\n", {"tune_demo_cpu.json": tuning})
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "| reference | - | `sft_continue` | demo settings | 0.0617 |" in text
    assert "| 1 | lambda_gfn | `gflowgr_tb` | gfn.lambda_gfn=0.1 | 0.0620 |" in text
    assert "943 users" in text and "test never read" in text and "`gfn.n_aug=3`" in text
    (root / "benchmarks" / "results" / "tune_demo_cpu.json").write_text(json.dumps({**tuning, "runs": [{"x": 1}]}))
    with pytest.raises(report.ReportError, match=r"tune_demo_cpu.json: runs\[0\] has no 'valid'"):
        report.render_tuning(root / "benchmarks" / "results")


def test_batch_order_section_renders_every_run_and_the_means_or_says_how_to_run_it(tmp_path):
    assert "pending: run `python benchmarks/bench_batch_order.py`" in rendered_section(tmp_path / "none",
                                                                                       "batch_order", {})
    test = {"recall@5": 0.0178, "recall@10": 0.0305, "ndcg@5": 0.011, "ndcg@10": 0.015}
    runs = [{"order": "windows", "seed": 42, "epochs": 4, "best_epoch": 4, "best_valid": 0.0218,
             "seconds_per_epoch": 183.2, "test": test},
            {"order": "shuffled", "seed": 42, "epochs": 4, "best_epoch": 3, "best_valid": 0.0214,
             "seconds_per_epoch": 308.3, "test": {**test, "ndcg@10": 0.0145}}]
    summary = {"windows": {"seeds": [42], **test, "seconds_per_epoch": 183.2, "seed_range": {"ndcg@10": 0.0}},
               "shuffled": {"seeds": [42], **test, "ndcg@10": 0.0145, "seconds_per_epoch": 308.3,
                            "seed_range": {"ndcg@10": 0.0}},
               "paired_seeds": [42], "windows_minus_shuffled": {"ndcg@10": 0.0005}}
    payload = {**HEADER, "data": "Beauty", "num_train_examples": 131413, "batch_size": 1024, "epochs": 4,
               "valid_users": 5000, "select_metric": "ndcg@10", "complete": False, "runs": runs, "summary": summary}
    text = rendered_section(tmp_path / "one", "batch_order", {"batch_order_cpu.json": payload})
    assert "| windows | 42 | 4 of 4 | 0.0218 | 183 | 0.0178 | 0.0305 | 0.0110 | 0.0150 |" in text
    assert "| shuffled | 42 | 3 of 4 | 0.0214 | 308 | 0.0178 | 0.0305 | 0.0110 | 0.0145 |" in text
    assert "| shuffled | 42 | 308 | 0.0178 | 0.0305 | 0.0110 | 0.0145 | 0.0000 |" in text
    assert "131,413 training examples, batch 1,024, 4 epochs per run" in text
    assert "**partial**" in text


def test_fsdp_file_renders_every_rank_and_the_summary(tmp_path):
    rank = {"rank": 0, "state_mb": 100.0, "peak_over_baseline_mb": 300.0, "step_seconds": 2.0}
    payload = {**HEADER, "backend": "gloo", "world_size": 2, "note": "shared CPU",
               "sizes": {"parameters": 1000, "layers": 2, "hidden": 8, "stage": "sft", "optimizer": "AdamW",
                         "dtype": "float32", "global_batch": 4, "timed_steps": 3},
               "runs": {"ddp": [rank], "fsdp": [{**rank, "state_mb": 50.0, "peak_over_baseline_mb": 200.0}]},
               "summary": {"memory_ratio_fsdp_over_ddp": 0.6667}}
    root = make_root(tmp_path, "<!-- report:fsdp -->\n<!-- /report:fsdp -->\n", {"fsdp_cpu.json": payload})
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "| DDP | 0 | 100 | 300 | 2.00 |" in text and "| FSDP2 | 0 | 50.0 | 200 | 2.00 |" in text
    assert "a 1,000-parameter model (2 layers, hidden 8)" in text and "`memory_ratio_fsdp_over_ddp`: 0.6667" in text


def test_trl_logps_file_renders_each_variant_and_the_summary(tmp_path):
    row = {"variant": "trl_fused", "baseline": True, "cpu_median_ms": 2000.0, "median_ms": 2500.0,
           "tensor_peak_mb": 238.5, "rss_extra_peak_mb": 900.0, "reps": 2}
    payload = {**HEADER, "quick": False,
               "sizes": {"vocab": 151936, "hidden": 256, "layers": 2, "tied_embeddings": True, "dtype": "float32",
                         "batch": 32, "prompt": 48, "reps": 2},
               "rows": [row, {**row, "variant": "sid_trie", "baseline": False, "cpu_median_ms": 500.0}],
               "summary": {"trl_fused_over_sid_trie_cpu_time": 4.0}}
    root = make_root(tmp_path, "<!-- report:trl_logps -->\n<!-- /report:trl_logps -->\n",
                     {"trl_logps_cpu.json": payload})
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "| trl_fused | yes | 2,000 | 2,500 | 238 | 900 |" in text and "| sid_trie | no | 500 |" in text
    assert "V = 151,936, hidden 256, 2 layers, tied embeddings" in text
    assert "`trl_fused_over_sid_trie_cpu_time`: 4.00" in text


def test_trl_logps_cuda_file_renders_the_cuda_columns_beside_the_cpu_file(tmp_path):
    sizes = {"vocab": 151936, "hidden": 256, "layers": 2, "tied_embeddings": True, "dtype": "float32", "batch": 32,
             "prompt": 48, "reps": 10}
    cpu_row = {"variant": "trl_fused", "baseline": True, "cpu_median_ms": 2000.0, "median_ms": 2500.0,
               "tensor_peak_mb": 238.5, "rss_extra_peak_mb": 900.0}
    cuda_row = {"variant": "trl_fused", "baseline": True, "median_ms": 3.5, "cuda_peak_mb": 1234.0,
                "cuda_allocated_before_mb": 300.0}
    cuda = {**HEADER, "device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "quick": False, "sizes": sizes,
            "rows": [cuda_row], "summary": {"trl_fused_over_sid_trie_cuda_peak": 2.5}}
    cpu = {**HEADER, "quick": False, "sizes": sizes, "rows": [cpu_row], "summary": {"x_cpu_time": 1.0}}
    root = make_root(tmp_path, "<!-- report:trl_logps -->\n<!-- /report:trl_logps -->\n",
                     {"trl_logps_cpu.json": cpu, "trl_logps_cuda.json": cuda})
    assert report.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "| trl_fused | yes | 2,000 | 2,500 | 238 | 900 |" in text
    assert "| trl_fused | yes | 3.50 | 1,234 | 300 |" in text and "NVIDIA H100" in text
    assert "`trl_fused_over_sid_trie_cuda_peak`: 2.50" in text


def test_quality_summary_puts_ours_the_teacher_and_published_rows_in_one_table(tmp_path):
    quality = {**HEADER, "methods": {"gflowgr_tb": {"recall@10": {"mean": 0.065, "std": 0.001}, "seeds_done": [42, 43]}},
               "reference": {"sasrec": {"recall@10": {"mean": 0.0846, "std": 0.0}, "seeds_done": [42]}},
               "paper": {"published_same_split": {"LETTER-TIGER": {"recall@10": 0.0672, "ndcg@10": 0.0364}}},
               "comparisons": {"gflowgr_tb-sdpo": {"ndcg@10": {"diff": 0.001, "ci95": [0.0002, 0.0018], "p": 0.01}}}}
    (tmp_path / "quality_beauty_cpu.json").write_text(json.dumps(quality))
    text = report.render_quality_summary(tmp_path)
    assert "| `gflowgr_tb` | 42, 43 | – | 0.0650 ± 0.0010 | – | – | – |" in text
    assert "| sasrec (teacher, reference) | 42 | – | 0.0846 | – | – | – |" in text
    assert "| LETTER-TIGER (published) | – | – | 0.0672 | – | 0.0364 | – |" in text
    assert "`gflowgr_tb` vs `sdpo`: above it on ndcg@10 (+0.0010, p = 0.01)." in text
    assert "pending" in report.render_quality_summary(tmp_path / "absent")
    assert "The GFlowGR rows were trained" not in text  # no run configs in this file
    assert "No finished seed" not in text and "left out" not in text
    quality.update(missing=["sdpo"], outdated={"runs/beauty/sdpo/seed42": "started from another checkpoint"})
    (tmp_path / "quality_beauty_cpu.json").write_text(json.dumps(quality))
    for text in (report.render_quality_summary(tmp_path), "\n".join(report.unfinished(quality))):  # both tables
        assert "No finished seed: `sdpo`." in text
        assert "1 finished run(s) are left out until they are trained again" in text


def test_quality_summary_names_the_setting_the_gflowgr_runs_used(tmp_path):
    def run(stage, lam, **reward):
        return {"config": {"stage": stage, "gfn": {"lambda_gfn": lam, "reward": {"cm_norm": "softmax",
                                                                                   "cm_temperature": 1.0, **reward}}}}
    runs = [run("sft", 1.0), run("gflowgr", 0.1, use_a=False), run("gflowgr", 0.1, use_a=False),
            run("gflowgr", 0.3, use_a=True, use_sim=True)]
    quality = {**HEADER, "methods": {"gflowgr_tb": {"recall@10": {"mean": 0.065, "std": 0.001}, "seeds_done": [42]}},
               "runs": runs}
    (tmp_path / "quality_beauty_cpu.json").write_text(json.dumps(quality))
    text = report.render_quality_summary(tmp_path)
    assert ("The GFlowGR rows were trained with λ_gfn 0.1 and the reward r_cm (`cm_norm: softmax`, τ 1.0); "
            "λ_gfn 0.3 and the reward r_cm (`cm_norm: softmax`, τ 1.0) + r_a + r_sim (each run's recorded config)."
            in text)


def test_benchmark_rows_quote_baseline_and_ours_from_the_same_file(tmp_path):
    trl = {**HEADER, "sizes": {"vocab": 151936, "batch": 32, "hidden": 256, "layers": 2},
           "rows": [{"variant": "trl_fused", "cpu_median_ms": 200.0, "tensor_peak_mb": 240.0},
                    {"variant": "sid_vocab", "cpu_median_ms": 50.0, "tensor_peak_mb": 400.0},
                    {"variant": "sid_trie", "cpu_median_ms": 20.0, "tensor_peak_mb": 240.0}]}
    (tmp_path / "trl_logps_cpu.json").write_text(json.dumps(trl))
    text = report.render_benchmark_rows(tmp_path)
    assert "| 200 ms, 240 MB | 20.0 ms, 240 MB | 10.0x less CPU time |" in text
    assert "`trl_logps_cpu.json` on CPU: Test CPU (2 logical cores)" in text and "FSDP2" not in text
