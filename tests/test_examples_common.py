"""Every script in examples/ takes --smoke and reads its data from $GFLOWGR_DATA by default; the HF Trainer
example runs end to end with --smoke and prints a `gflowgr eval` command the CLI accepts."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def load_example(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_takes_smoke_and_reads_gflowgr_data(path, monkeypatch, tmp_path):
    if path.stem == "minionerec_grpo_gflownet":
        pytest.importorskip("trl", reason="trl is not installed (pip install 'gflowgr[trl]')")
    assert '"--smoke"' in path.read_text(), f"{path.name} takes no --smoke"
    monkeypatch.setenv("GFLOWGR_DATA", str(tmp_path))
    module = load_example(path)
    assert Path(module.DEFAULT_DATA).is_relative_to(tmp_path), (path.name, module.DEFAULT_DATA)
    with pytest.raises(SystemExit, match="GFLOWGR_DATA"):  # nothing there: the message says where it looked
        module.main(["--smoke", "--out", str(tmp_path / "out")] if path.stem != "t5_tiger_tb"
                    and path.stem != "causal_lm_add_tb" else ["--smoke"])


def test_hf_trainer_example_smoke(beauty_tiny, tmp_path, capsys, monkeypatch):
    from gflowgr_core.cli import build_parser

    monkeypatch.delenv("RANK", raising=False)  # one plain process: rank 0, which prints

    result = load_example(ROOT / "examples" / "hf_trainer_gflowgr.py").main(
        ["--smoke", "--data", str(beauty_tiny), "--out", str(tmp_path / "hf")])
    for stage in ("sft_valid", "gflowgr_valid"):
        assert 0.0 <= result[stage]["eval_recall@10"] <= 1.0
    assert Path(result["checkpoint"]).is_dir() and any(Path(result["checkpoint"]).iterdir())
    printed = capsys.readouterr().out
    assert result["eval_command"] in printed
    argv = shlex.split(result["eval_command"])
    assert argv[:2] == ["gflowgr", "eval"]
    args = build_parser().parse_args(argv[1:])
    assert args.checkpoint == result["checkpoint"] and args.split == "test"


HF_EXAMPLE = ROOT / "examples" / "hf_trainer_gflowgr.py"


def test_hf_trainer_example_prints_only_on_rank_0(monkeypatch, capsys):
    """Every rank of `accelerate launch` runs the script: rank 0 prints, the others stay quiet, and the script
    prints through nothing but ``say``."""
    import ast

    module = load_example(HF_EXAMPLE)
    for rank, expected in (("1", ""), ("3", ""), ("0", "hello rank 0\n")):
        monkeypatch.setenv("RANK", rank)
        assert module.is_main_process() is (rank == "0")
        module.say("hello", "rank", 0)
        assert capsys.readouterr().out == expected, rank
    monkeypatch.delenv("RANK")
    module.say("alone")  # a plain script: no RANK, no process group
    assert capsys.readouterr().out == "alone\n"
    tree = ast.parse(HF_EXAMPLE.read_text())
    printers = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                for call in ast.walk(fn) if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print"}
    assert printers == {"say"}, f"print() called outside say(): {printers}"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flags,cuda,use_cpu", [
    ([], True, False),            # a GPU machine: train on the GPU
    (["--cpu"], True, True),      # forced onto the CPU
    (["--smoke"], True, True),    # the smoke run stays on the CPU
    ([], False, True),            # no CUDA: the CPU
])
def test_hf_trainer_example_device_flags(flags, cuda, use_cpu, beauty_tiny, monkeypatch, tmp_path):
    """What the command line gives ``GFlowGRConfig.use_cpu`` (the config is intercepted before any training)."""
    module = load_example(HF_EXAMPLE)
    seen = {}

    def config(**kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(module, "GFlowGRConfig", config)
    with pytest.raises(_Stop):
        module.main([*flags, "--data", str(beauty_tiny), "--out", str(tmp_path / "out")])
    assert seen["use_cpu"] is use_cpu and seen["stage"] == "sft"
    assert not (tmp_path / "out" / "data").exists()  # nothing prepared before the config (and its barrier) exists


def test_hf_trainer_example_prepares_inside_main_process_first(monkeypatch, tmp_path):
    """The data folder is prepared inside the config's ``main_process_first`` block (rank 0 first, the other ranks
    after the barrier), and a folder already prepared is loaded, not prepared again."""
    import contextlib

    module = load_example(HF_EXAMPLE)
    events = []

    class Config:
        @contextlib.contextmanager
        def main_process_first(self, local=True, desc="work"):
            events.append(("enter", local))
            yield
            events.append(("exit", local))

    def fake_prepare(fmt, source, out, max_users=None):
        events.append(("prepare", fmt, source, max_users))
        out.mkdir(parents=True)
        (out / "stats.json").write_text("{}")
        return "prepared"

    monkeypatch.setattr(module, "prepare", fake_prepare)
    monkeypatch.setattr(module.PreparedData, "load", staticmethod(lambda path: events.append(("load",)) or "loaded"))
    data_dir = tmp_path / "data"
    assert module.load_or_prepare(Config(), "src", data_dir, 40) == "prepared"
    assert module.load_or_prepare(Config(), "src", data_dir, 40) == "loaded"
    assert events == [("enter", False), ("prepare", "letter", "src", 40), ("exit", False),
                      ("enter", False), ("load",), ("exit", False)]
