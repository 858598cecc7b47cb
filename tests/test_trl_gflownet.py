"""GFlowNetTrainer (GRPOTrainer's constructor and rollouts, balance loss): loss equals the library's functional
objectives on the same rollouts; a run resumes from its checkpoint."""
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'gflowgr[trl]')")

import gflowgr_core.functional as F  # noqa: E402
from gflowgr_core.integrations.trl import (GFlowNetConfig, GFlowNetTrainer,  # noqa: E402
                                           sid_codes_from_strings)
from test_trl_logps import tiny_setup  # noqa: E402  (tests/ is on sys.path under pytest)


def _reward(completions, target, **_):
    """1 + number of SID levels shared with the target (so every rollout has R >= 1, several distinct values)."""
    got, want = sid_codes_from_strings(completions), sid_codes_from_strings(target)
    return (1.0 + (got == want).sum(1).float()).tolist()


def _dataset(rows, n=8):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "target": r["target"]} for r in rows[:n]])


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=3,
                max_completion_length=8, learning_rate=1e-3, report_to="none", use_cpu=True, bf16=False,
                logging_steps=1, save_strategy="no", seed=0, temperature=1.2)
    base.update(kw)
    return GFlowNetConfig(**base)


@pytest.mark.parametrize("objective", ["tb", "db", "subtb"])
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_loss_equals_functional_objective_on_the_same_rollouts(tmp_path, objective, sft_weight):
    tok, model, vocab, _, rows = tiny_setup(seed=11)
    args = _config(tmp_path, gfn_objective=objective, sft_weight=sft_weight,
                   sft_column="target" if sft_weight else None, log_z_init=0.7, reward_beta=2.0)
    trainer = GFlowNetTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(rows),
                              processing_class=tok, sid_vocab=vocab)
    heads = trainer.flow_heads
    with torch.no_grad():  # heads that depend on the prompt, as after some training
        for head in (heads.log_z, heads.log_f):
            head.net[2].weight.normal_(0, 0.5)
    model.train()
    batch = [dict(r) for r in _dataset(rows, 4) for _ in range(2)]
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions(batch)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, inputs)

    # the same rollouts through the functional API
    comp, cmask = inputs["completion_ids"], inputs["completion_mask"]
    prompt = inputs["prompt_ids"]
    L = vocab.num_levels
    texts = tok.batch_decode(comp, skip_special_tokens=True)
    log_r = 2.0 * torch.log(torch.tensor(_reward(texts, [b["target"] for b in batch])) + 1e-4)
    torch.testing.assert_close(inputs["gfn_log_r"], log_r)
    ids = torch.cat([prompt, comp], 1)
    attn = torch.cat([inputs["prompt_mask"], cmask], 1)
    hidden = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
    h = F.decision_hidden(hidden, prompt.shape[1], L)
    codes = vocab.codes_from_text(texts)
    w_sid, bias = F.sid_head_rows(model, vocab.sid_token_ids)
    log_pf = F.constrained_log_pf(h, w_sid, codes, vocab.trie, bias=bias)
    log_z = heads.log_z(h[:, 0])
    log_f = heads.log_f(h[:, 1:])
    if objective == "tb":
        want = F.trajectory_balance(log_pf, log_z, log_r)
    elif objective == "db":
        want = F.detailed_balance(log_pf, log_z, log_f, log_r)
    else:
        want = F.subtrajectory_balance(log_pf, log_z, log_f, log_r, subtb_lambda=0.9)
    if sft_weight:
        ref_codes = vocab.codes_from_text([b["target"] for b in batch])
        ref_ids = torch.cat([prompt, vocab.token_ids(ref_codes)], 1)
        ref_attn = torch.cat([inputs["prompt_mask"], torch.ones_like(ref_codes)], 1)
        ref_hidden = model(input_ids=ref_ids, attention_mask=ref_attn, output_hidden_states=True).hidden_states[-1]
        ref_pf = F.constrained_log_pf(F.decision_hidden(ref_hidden, prompt.shape[1], L), w_sid, ref_codes,
                                      vocab.trie, bias=bias)
        want = want + sft_weight * F.sft_cross_entropy(ref_pf)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert want.item() > 0
    loss.backward()
    assert heads.log_z.net[2].weight.grad.abs().sum() > 0
    if objective != "tb":
        assert heads.log_f.net[2].weight.grad.abs().sum() > 0


def test_training_moves_log_z_and_uses_its_own_learning_rate(tmp_path):
    tok, model, vocab, _, rows = tiny_setup(seed=12)
    args = _config(tmp_path, max_steps=4, learning_rate=1e-4, flow_learning_rate=0.05)
    trainer = GFlowNetTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(rows),
                              processing_class=tok, sid_vocab=vocab)
    z0 = trainer.flow_heads.log_z.net[2].bias.item()
    trainer.train()
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [1e-4, 0.05]
    assert trainer.flow_heads.log_z.net[2].bias.item() != z0
    logs = [h for h in trainer.state.log_history if "gfn/balance" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)


def test_run_resumes_from_its_checkpoint(tmp_path):
    """Stopped after step 2 and resumed from checkpoint-2, a run ends where the uninterrupted run ends."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out, resume=None, stop=False):
        tok, model, vocab, _, rows = tiny_setup(seed=13)
        args = _config(out, max_steps=4, save_strategy="steps", save_steps=2, gfn_objective="db",
                       flow_learning_rate=0.02)
        trainer = GFlowNetTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(rows),
                                  processing_class=tok, sid_vocab=vocab, callbacks=[StopAt()] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    part = run(tmp_path / "part", stop=True)
    assert part.state.global_step == 2 and (tmp_path / "part" / "checkpoint-2").is_dir()
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    a = dict(full.model.named_parameters())
    b = dict(resumed.model.named_parameters())
    assert any(k.startswith("gflowgr_flows.") for k in a)
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, rtol=1e-5, atol=1e-6, msg=name)
    # and the run did learn something in steps 3-4 (so equality is not trivial)
    first = dict(part.model.named_parameters())
    assert not torch.allclose(first["gflowgr_flows.log_z.net.2.bias"], a["gflowgr_flows.log_z.net.2.bias"])


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="gfn_objective must be"):
        _config(tmp_path, gfn_objective="fm")
    with pytest.raises(ValueError, match="beta=0.1: the GFlowNet objective has no KL term"):
        _config(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="sft_weight > 0 needs sft_column"):
        _config(tmp_path, sft_weight=1.0)
