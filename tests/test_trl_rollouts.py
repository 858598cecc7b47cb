"""Trie-constrained rollouts for TRL's GRPOTrainer: every sampled completion is a catalogue SID."""
import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'gflowgr[trl]')")

from gflowgr_core.integrations.trl import (SIDGRPOTrainer, install_constrained_generation,  # noqa: E402
                                           remove_constrained_generation, sid_codes_from_strings)
from test_trl_logps import tiny_setup  # noqa: E402  (tests/ is on sys.path under pytest)


def _catalogue_strings(vocab):
    leaves = torch.arange(vocab.trie.num_leaves) + vocab.trie.level_offsets[vocab.num_levels]
    return set(vocab.text(vocab.trie.leaf_sid(leaves)))


def _check_completions(tok, vocab, prompt_width, out, with_end):
    comp = out[:, prompt_width:]
    L = vocab.num_levels
    codes, valid = vocab.completion_codes(comp)
    assert int((~valid).sum()) == 0, f"{int((~valid).sum())} invalid items"
    if with_end:
        assert bool((comp[:, L] == tok.eos_token_id).all())
    else:
        assert comp.shape[1] == L
    return codes


@pytest.mark.parametrize("sampling", [dict(do_sample=True, temperature=1.3, num_return_sequences=4),
                                      dict(do_sample=True, top_k=3, top_p=0.6, temperature=0.7),
                                      dict(do_sample=True, min_p=0.2, num_return_sequences=4),
                                      dict(num_beams=4, num_return_sequences=4, do_sample=False)])
@pytest.mark.parametrize("with_end", [True, False])
def test_constrained_generate_only_emits_catalogue_sids(sampling, with_end):
    tok, model, vocab, _, rows = tiny_setup(seed=7)
    # a head that prefers non-SID tokens, so unconstrained sampling would almost never give a SID
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab.sid_token_ids] *= 0.1
    enc = tok([r["prompt"] for r in rows[:8]], return_tensors="pt", padding=True)
    unconstrained = model.generate(**enc, max_new_tokens=4, do_sample=True, pad_token_id=tok.pad_token_id)
    _, valid = vocab.completion_codes(unconstrained[:, enc["input_ids"].shape[1]:])
    assert int((~valid).sum()) > 0  # the check below can fail
    install_constrained_generation(model, vocab, with_end_token=with_end)
    torch.manual_seed(0)
    leaves = []
    for _ in range(3 if "num_beams" in sampling else 8):
        out = model.generate(**enc, max_new_tokens=16, pad_token_id=tok.pad_token_id, **sampling)
        codes = _check_completions(tok, vocab, enc["input_ids"].shape[1], out, with_end)
        leaves.append(vocab.trie.leaf_of(codes))
    leaves = torch.cat(leaves).unique()
    if "num_beams" not in sampling and "top_k" not in sampling:
        items_per_leaf = vocab.trie.leaf_ptr[1:] - vocab.trie.leaf_ptr[:-1]
        shared = items_per_leaf[leaves - vocab.trie.level_offsets[vocab.num_levels]] > 1
        assert bool(shared.any()), "no sampled SID is shared by several items"
    with pytest.raises(ValueError, match="already constrained"):
        install_constrained_generation(model, vocab)
    remove_constrained_generation(model)
    assert "generate" not in vars(model)


def test_grpo_training_rollouts_are_catalogue_sids(tmp_path):
    """A few GRPOTrainer steps (SID log-probs, constrained rollouts): every completion the reward sees is a SID."""
    from datasets import Dataset
    from trl import GRPOConfig

    tok, model, vocab, _, rows = tiny_setup(seed=8)
    catalogue = _catalogue_strings(vocab)
    seen = []

    def reward(completions, target, **_):
        out = []
        for c, t in zip(completions, target):
            seen.append("".join(vocab.text(vocab.codes_from_text([c]))))
            out.append(1.0 if sid_codes_from_strings([c]).tolist() == sid_codes_from_strings([t]).tolist() else
                       0.1)
        return out

    ds = Dataset.from_list([{"prompt": r["prompt"], "target": r["target"]} for r in rows[:8]])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_steps=3,
                      max_completion_length=8, learning_rate=1e-3, report_to="none", use_cpu=True, bf16=False,
                      logging_steps=1, save_strategy="no", seed=0, temperature=1.5)
    trainer = SIDGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                             sid_vocab=vocab, sid_support="trie")
    before = model.get_output_embeddings().weight.detach().clone()
    trainer.train()
    assert len(seen) == 3 * 8 and set(seen) <= catalogue
    assert not torch.equal(before, model.get_output_embeddings().weight.detach())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_trainer_refuses_an_end_token_that_does_not_stop_generation(tmp_path):
    from test_trl_logps import make_grpo

    tok, model, vocab, _, _ = tiny_setup()
    vocab.end_token_id = tok.pad_token_id
    with pytest.raises(ValueError, match="end_token_id=1 is not one of the trainer's EOS ids"):
        make_grpo(SIDGRPOTrainer, tok, model, tmp_path, sid_vocab=vocab)
