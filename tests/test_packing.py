"""Packed trajectory trees against per-prefix prompts: the contract of ``packing: true``.

Hidden states, flows, log P_F, every stage's loss and every parameter gradient must equal the per-prefix
path within fp32 1e-5 (relative to the largest value), for eager and sdpa attention, Qwen2 and Llama, with
and without a prompt template, on random data and on the bundled Beauty slice (short users, users longer
than ``max_history``, shared SIDs).
"""
from __future__ import annotations

import copy

import pytest
import torch

from gflowgr_core.data.prepared import prepare
from gflowgr_core.data.windows import left_align, trunk_windows, window_order
from gflowgr_core.model.packing import PackingUnsupported, attention_mask_for, pack_trajectories
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.train.checkpoint import save_policy
from gflowgr_core.train.config import ConfigError, load_config
from gflowgr_core.train.trainer import Trainer

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _randomise_heads(policy: SIDPolicy, seed: int) -> None:
    """Flow heads start at zero output; give them weights so their parity is not trivially 0 == 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.flow_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------- windows
def test_left_align_keeps_item_order():
    h = torch.tensor([[-1, -1, 4, 5], [7, -1, 8, -1], [-1, -1, -1, -1]])
    items, n = left_align(h)
    assert n.tolist() == [2, 2, 0]
    assert items.tolist() == [[4, 5, -1, -1], [7, 8, -1, -1], [-1, -1, -1, -1]]


def test_trunk_windows_follow_prefix_runs():
    # user A: [1], [1 2], [1 2 3]; then truncated [2 3 4] starts later: own window; user B: [9], [9 8].
    h = torch.tensor([[-1, -1, 1], [-1, 1, 2], [1, 2, 3], [2, 3, 4], [-1, -1, 9], [-1, 9, 8], [-1, 9, 7]])
    assert trunk_windows(h).tolist() == [0, 0, 0, 1, 2, 2, 3]


def test_window_order_is_a_permutation_with_windows_together():
    window = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    index = torch.tensor([0, 1, 2, 3, 5, 6, 7])   # a subset (row 4 left out)
    order = window_order(index, window, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == index.tolist()
    w = window[order]
    changes = int((w[1:] != w[:-1]).sum())
    assert changes == len(torch.unique(w)) - 1            # each window appears as one run
    for k in torch.unique(w):
        rows = order[w == k]
        assert torch.equal(rows, rows.sort().values)       # in row order within the window


def test_wrong_window_is_rejected():
    h = torch.tensor([[-1, 1], [-1, 2]])
    codes = torch.zeros(2, 1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="not a prefix"):
        pack_trajectories(h, codes, item_tokens=torch.arange(20).view(10, 2), level_tokens=torch.arange(8).view(2, 4),
                          bos_id=1, sep_id=3, pad_id=0, prefix=torch.zeros(0, dtype=torch.long),
                          suffix=torch.zeros(0, dtype=torch.long), window=torch.tensor([0, 0]))


def test_layout_of_the_documented_example():
    """Two examples of one window (histories [A] and [A, B]), L = 3, one trajectory each."""
    item_tokens = torch.tensor([[10, 20, 30], [11, 21, 31]])
    level_tokens = torch.tensor([[10, 11], [20, 21], [30, 31]])
    h = torch.tensor([[-1, 0], [0, 1]])
    codes = torch.tensor([[[1, 1, 1]], [[0, 0, 0]]])
    none = torch.zeros(0, dtype=torch.long)
    lay = pack_trajectories(h, codes, item_tokens=item_tokens, level_tokens=level_tokens, bos_id=1, sep_id=3,
                            pad_id=0, prefix=none, suffix=none, window=torch.tensor([5, 5]), row_tokens=13)
    assert lay.input_ids.tolist() == [[1, 10, 20, 30, 11, 21, 31, 3, 11, 21, 3, 10, 20]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]]
    a = lay.allowed[0].int()
    assert a[7].tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]     # SEP of [A]: BOS + A only
    assert a[9].tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]     # its c_2: + SEP, c_1
    assert a[10].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0]    # SEP of [A, B]: the whole trunk
    assert lay.sep_index.tolist() == [7, 10]
    assert lay.branch_index.tolist() == [[[8, 9]], [[11, 12]]]


# ------------------------------------------------------------------------------------ random policies
def _policy(arch: str, attn: str, template: bool, n_items: int = 30, seed: int = 0) -> SIDPolicy:
    cpl = (6, 7, 5)
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (n_items,), generator=g) for k in cpl], 1)
    tm = SIDTokenMap.from_scratch(cpl)
    lm = build_tiny_causal_lm(tm.vocab_size, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                              max_positions=160, arch=arch, attn_implementation=attn, seed=seed)
    policy = SIDPolicy(lm, tm, codes, cpl, flow_hidden=16)
    if template:
        policy.set_prompt_template([tm.eos_id, tm.bos_id], [tm.eos_id, tm.pad_id])
    _randomise_heads(policy, seed)
    return policy


def _random_examples(n_items: int, max_history: int, seed: int):
    """Per-prefix rows of a few users (some longer than max_history), shuffled, with their windows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in (2, 4, max_history + 4, 1, max_history + 1):
        seq = torch.randint(0, n_items, (length + 1,), generator=g)
        for t in range(1, length + 1):
            h = seq[max(0, t - max_history):t]
            rows.append(torch.cat([torch.full((max_history - len(h),), -1), h]))
    history = torch.stack(rows)
    window = trunk_windows(history)
    perm = torch.randperm(len(rows), generator=g)
    return history[perm], window[perm]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("template", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_packed_hidden_and_gradients_match_per_prefix(arch, attn, template, sparse):
    policy = _policy(arch, attn, template)
    history, window = _random_examples(policy.num_items, max_history=5, seed=1)
    g = torch.Generator().manual_seed(2)
    codes = policy.item_codes[torch.randint(0, policy.num_items, (history.shape[0], 3), generator=g)]
    assert int(torch.unique(window).numel()) < history.shape[0]      # some examples do share a trunk
    outs, grads = [], []
    for packed in (False, True):
        policy.zero_grad(set_to_none=True)
        if packed:
            h, log_z, log_f = policy.packed_trajectory_hidden(history, codes, window, row_tokens=48, sparse=sparse)
        else:
            h, log_z, log_f = policy.trajectory_hidden(history, codes)
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(4))
        ((h * w).sum() + log_z.square().sum() + log_f.sin().sum()).backward()
        outs.append((h.detach(), log_z.detach(), log_f.detach()))
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    for a, b, what in zip(outs[1], outs[0], ("h", "log_z", "log_f")):
        assert _rel(a, b) <= TOL, what
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert _rel(grads[1][name], grads[0][name]) <= TOL, name


def test_packing_without_windows_and_at_static_shape():
    policy = _policy("qwen2", "sdpa", False)
    history, window = _random_examples(policy.num_items, max_history=5, seed=5)
    codes = policy.item_codes[torch.zeros(history.shape[0], 2, dtype=torch.long)]
    ref, _, _ = policy.trajectory_hidden(history, codes)
    alone, _, _ = policy.packed_trajectory_hidden(history, codes, None)
    static, _, _ = policy.packed_trajectory_hidden(history, codes, window, row_tokens=64, rows=12)
    assert _rel(alone, ref) <= TOL and _rel(static, ref) <= TOL
    with pytest.raises(ValueError, match="rows"):
        policy.packed_trajectory_hidden(history, codes, window, row_tokens=64, rows=1)


def test_model_without_4d_masks_gets_a_clear_error():
    policy = _policy("qwen2", "sdpa", False)
    policy.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PackingUnsupported, match="packing: false"):
        attention_mask_for(policy.model, torch.ones(1, 2, 2, dtype=torch.bool), torch.float32)


def test_check_packing_catches_a_model_that_ignores_the_mask(monkeypatch):
    policy = _policy("llama", "sdpa", False)
    policy.check_packing(sparse=False)                     # a model that honours the mask passes
    import gflowgr_core.model.packing as packing

    monkeypatch.setattr(packing, "attention_mask_for", lambda model, allowed, dtype: None)  # mask dropped
    with pytest.raises(PackingUnsupported, match="packing: false"):
        policy.check_packing(sparse=False)


def test_check_packing_catches_a_sparse_forward_that_sees_too_much(monkeypatch):
    policy = _policy("qwen2", "sdpa", False)
    policy.check_packing(sparse=True)
    import gflowgr_core.model.block_attention as block_attention

    real = block_attention.block_plan
    causal = lambda allowed, *a, **k: real(torch.ones_like(allowed).tril(), *a, **k)  # noqa: E731
    monkeypatch.setattr(block_attention, "block_plan", causal)   # every earlier token visible
    with pytest.raises(PackingUnsupported, match="packing: false"):
        policy.check_packing(sparse=True)


# -------------------------------------------------------------------------------- stages on Beauty
TINY = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.kv_heads=2", "model.intermediate=48",
        "model.flow_hidden=16", "warmup_steps=1", "gfn.reward.use_cm=false", "gfn.sampler=random",
        "pref.sampler=random"]


@pytest.fixture(scope="module")
def beauty(tmp_path_factory, beauty_tiny):
    out = tmp_path_factory.mktemp("beauty_pack")
    data = prepare("letter", beauty_tiny, out)
    start = tmp_path_factory.mktemp("start")
    sft = Trainer(load_config(None, [f"data={out}", f"out={start}", "stage=sft", *TINY]), data)
    _randomise_heads(sft.policy, 7)
    save_policy(sft.policy, start / "init", sft.cfg)
    return out, data, start / "init"


def _mixed_rows(data, n_long_users: int = 2, n_rows: int = 72) -> torch.Tensor:
    """Rows of the longest users (histories truncated at max_history) and of short ones."""
    train = data.split.train
    users, counts = torch.unique(train.user, return_counts=True)
    long_users = users[counts.argsort(descending=True)[:n_long_users]]
    rows = torch.cat([torch.nonzero(train.user == u).flatten() for u in long_users])
    short = torch.nonzero(torch.isin(train.user, users[counts <= 3])).flatten()
    return torch.cat([rows, short])[:n_rows]


@pytest.mark.parametrize("stage,extra", [
    ("sft", []), ("sft_continue", []),
    ("gflowgr", ["gfn.objective=tb"]), ("gflowgr", ["gfn.objective=db"]),
    ("gflowgr", ["gfn.objective=subtb", "gfn.weighting=reward"]),
    ("gflowgr", ["gfn.objective=tb", "gfn.flow_warmup_steps=5"]),
    ("dpo", []), ("sdpo", []),
])
def test_every_stage_loss_and_gradients_match_per_prefix(beauty, tmp_path, stage, extra):
    data_dir, data, init = beauty
    rows = _mixed_rows(data)
    history = data.split.train.history[rows]
    assert bool(((history >= 0).sum(1) == data.split.max_history).any())       # truncated histories
    trainers = {}
    for packing in (False, True):
        overrides = [f"data={data_dir}", f"out={tmp_path / str(packing)}", f"stage={stage}",
                     f"init_checkpoint={init}", f"packing={str(packing).lower()}", *TINY, *extra]
        trainers[packing] = Trainer(load_config(None, overrides), data)
    cands = trainers[False].draw_candidates(rows)
    if cands is not None:
        # Include items whose SID is shared with another item (one leaf, several items).
        counts = torch.unique(data.catalog.codes, dim=0, return_counts=True, return_inverse=True)
        dup = torch.nonzero(counts[2][counts[1]] > 1).flatten()
        assert len(dup) > 0
        cands[: len(dup), 0] = dup[: len(cands)]
    results = {}
    for packing, trainer in trainers.items():
        trainer.policy.zero_grad(set_to_none=True)
        loss, logs = trainer.compute_loss(rows, cands)
        loss.backward()
        results[packing] = (loss.detach(), logs,
                            {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})
    (l0, logs0, g0), (l1, logs1, g1) = results[False], results[True]
    assert _rel(l1, l0) <= TOL
    for key in ("ce", "gfn", "pref", "log_z"):
        if key in logs0:
            assert abs(logs1[key] - logs0[key]) <= TOL * max(1.0, abs(logs0[key])), key
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert _rel(g1[name], g0[name]) <= TOL, name


def test_packed_epoch_keeps_batches_of_batch_size(beauty, tmp_path):
    data_dir, data, init = beauty
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=sft", "batch_size=50", *TINY])
    trainer = Trainer(cfg, data)
    order = window_order(trainer.train_index, trainer.windows, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == trainer.train_index.tolist()
    batch = trainer.batch(order[:50])
    assert len(batch) == 50
    # A batch cut from the window order shares trunks: fewer segments than examples.
    assert int(torch.unique(batch.window).numel()) < 50


def test_batch_order_shuffled_draws_examples_uniformly(beauty, tmp_path):
    data_dir, data, init = beauty
    base = [f"data={data_dir}", f"out={tmp_path}", "stage=sft", *TINY]
    windows = Trainer(load_config(None, base), data)
    shuffled = Trainer(load_config(None, [*base, "batch_order=shuffled"]), data)
    g = lambda: torch.Generator().manual_seed(3)
    by_window, uniform = windows.epoch_order(g()), shuffled.epoch_order(g())
    assert sorted(uniform.tolist()) == shuffled.train_index.tolist()
    # The window order keeps each window's rows adjacent; a uniform shuffle breaks most of those runs.
    def adjacent_same_window(order):
        w = windows.windows[order]
        return int((w[1:] == w[:-1]).sum())
    assert adjacent_same_window(by_window) == len(by_window) - int(torch.unique(windows.windows[by_window]).numel())
    assert adjacent_same_window(uniform) < adjacent_same_window(by_window) / 4
    # The same generator state gives the per-prefix path's shuffle.
    assert torch.equal(uniform, shuffled.train_index[torch.randperm(len(shuffled.train_index), generator=g())])


def test_batch_order_is_checked(beauty, tmp_path):
    data_dir, _, _ = beauty
    base = [f"data={data_dir}", f"out={tmp_path}", "stage=sft"]
    with pytest.raises(ConfigError, match="batch_order='users' is not one of"):
        load_config(None, [*base, "batch_order=users"])
    with pytest.raises(ConfigError, match="packing: false"):
        load_config(None, [*base, "batch_order=shuffled", "packing=false"])


# ------------------------------------------------------------------------------- compiled forward
def test_compile_mode_needs_packing_and_a_known_mode(beauty, tmp_path):
    from gflowgr_core.train.config import ConfigError

    data_dir, _, _ = beauty
    base = [f"data={data_dir}", f"out={tmp_path}", "stage=sft", *TINY]
    with pytest.raises(ConfigError, match="needs packing: true"):
        load_config(None, [*base, "packing=false", "compile_mode=default"])
    with pytest.raises(ConfigError, match="compile_mode='fast' is not one of"):
        load_config(None, [*base, "compile_mode=fast"])


def test_compiled_packed_forward_matches_eager(beauty, tmp_path):
    """``compile_mode: default`` gives the eager loss and gradients (GFlowGR-TB, the stage with the most
    branches), keeps the state dict's keys, and a copy of the compiled policy runs eagerly."""
    data_dir, data, init = beauty
    rows = _mixed_rows(data)
    trainers = {}
    for mode in ("eager", "default"):
        overrides = [f"data={data_dir}", f"out={tmp_path / mode}", "stage=gflowgr", f"init_checkpoint={init}",
                     "gfn.objective=tb", f"compile_mode={mode}", *TINY]
        trainers[mode] = Trainer(load_config(None, overrides), data)
    assert trainers["default"].policy.packed_forward_compiled and not trainers["eager"].policy.packed_forward_compiled
    cands = trainers["eager"].draw_candidates(rows)
    results = {}
    for mode, trainer in trainers.items():
        trainer.policy.zero_grad(set_to_none=True)
        loss, _ = trainer.compute_loss(rows, cands)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in trainer.policy.named_parameters()
                                         if p.grad is not None})
    (l0, g0), (l1, g1) = results["eager"], results["default"]
    assert _rel(l1, l0) <= TOL
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert _rel(g1[name], g0[name]) <= TOL, name
    compiled = trainers["default"].policy
    assert compiled.state_dict().keys() == trainers["eager"].policy.state_dict().keys()
    assert not copy.deepcopy(compiled).packed_forward_compiled
    compiled.compile_packed_forward("eager")
    assert not compiled.packed_forward_compiled


def test_packed_rows_per_batch_is_what_each_batch_packs_into(beauty, tmp_path):
    """The rows Trainer.packed_rows_per_batch reports are those of the drawn trajectories' layouts; their
    maximum as pack_rows fits the largest batch, one row fewer does not."""
    data_dir, data, init = beauty
    overrides = [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr", f"init_checkpoint={init}",
                 "batch_size=40", *TINY]
    trainer = Trainer(load_config(None, overrides), data)
    order = window_order(trainer.train_index, trainer.windows, torch.Generator().manual_seed(3))
    rows = trainer.packed_rows_per_batch(order)
    assert len(rows) == trainer.steps_per_epoch and len(set(rows)) > 1
    drawn = []
    for start in range(0, len(order), 40):
        traj = trainer.stage.draw(trainer.ctx, trainer.batch(order[start:start + 40]), trainer.generator)
        drawn.append(trainer.policy.packed_layout(traj.history, traj.codes, traj.window).input_ids.shape[0])
    assert rows == drawn
    widest = order[40 * rows.index(max(rows)):][:40]
    traj = trainer.stage.draw(trainer.ctx, trainer.batch(widest), trainer.generator)
    assert trainer.policy.packed_layout(traj.history, traj.codes, traj.window, rows=max(rows)).shape == (max(rows), 256)
    with pytest.raises(ValueError, match=f"needs {max(rows)} rows of 256 tokens, only {max(rows) - 1}"):
        trainer.policy.packed_layout(traj.history, traj.codes, traj.window, rows=max(rows) - 1)
    assert Trainer(load_config(None, [*overrides, "stage=sft"]), data).packed_rows_per_batch(order) != rows
