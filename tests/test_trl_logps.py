"""SID-row per-token log-probabilities against TRL's own (GRPOTrainer, trl 1.16) on a tiny Qwen2 with SID tokens.

Also holds the small helpers the other tests/test_trl_*.py files import (tiny tokenizer, model, fixture data).
"""
import csv
import math
from ast import literal_eval
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'gflowgr[trl]')")

from gflowgr_core.integrations.trl import (SIDGRPOTrainer, SIDVocabulary, completion_hidden,  # noqa: E402
                                           sid_codes_from_strings, sid_per_token_logps)
from gflowgr_core.model.policy import build_tiny_causal_lm  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minionerec_office"
PROMPT = ("### User Input: \nThe user has interacted with items {history} in chronological order. "
          "Can you predict the next possible item that the user may expect?\n\n### Response:\n")
WORDS = "### User Input : The user has interacted with items in chronological order . Can you predict the next " \
        "possible item that may expect ? Response ,"


# ------------------------------------------------------------------------------------------------ helpers
def fixture_rows():
    """The fixture's rows: dicts with 'prompt', 'target' (SID string) and 'history' (list of SID strings)."""
    with open(FIXTURE / "valid.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        hist = literal_eval(r["history_item_sid"])
        out.append({"prompt": PROMPT.format(history=", ".join(hist)), "target": r["item_sid"], "history": hist})
    return out


def tiny_tokenizer(sid_strings):
    """A word-level HF tokenizer over the prompt template's words plus every SID token of ``sid_strings``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2}
    for w in WORDS.split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    codes = sid_codes_from_strings(sid_strings)
    names = sorted({f"<{chr(97 + lvl)}_{c}>" for row in codes.tolist() for lvl, c in enumerate(row)})
    hf.add_tokens(names)
    hf.padding_side = "left"
    return hf


def tiny_setup(seed=0, hidden=32):
    """``(tokenizer, model, vocab, item_ids, rows)`` over the fixture catalogue (shared SIDs included)."""
    import json

    index = json.loads((FIXTURE / "Office_Products.index.json").read_text())
    rows = fixture_rows()
    strings = ["".join(v) for v in index.values()] + [s for r in rows for s in r["history"] + [r["target"]]]
    tok = tiny_tokenizer(strings)
    vocab, item_ids = SIDVocabulary.from_index(tok, FIXTURE / "Office_Products.index.json")
    model = build_tiny_causal_lm(len(tok), hidden=hidden, layers=2, heads=4, kv_heads=2, arch="qwen2", seed=seed,
                                 attn_implementation="eager")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return tok, model, vocab, item_ids, rows


def batch(tok, vocab, rows, n=6, end=True, seed=0):
    """Prompt + SID completion (+ end token, + right padding on some rows) as GRPO lays them out."""
    g = torch.Generator().manual_seed(seed)
    prompts = [r["prompt"] for r in rows[:n]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    codes = vocab.trie.leaf_sid(vocab.trie.level_offsets[vocab.num_levels]
                                + torch.randint(0, vocab.trie.num_leaves, (n,), generator=g))
    sid_ids = vocab.token_ids(codes)
    K = vocab.num_levels + 2
    comp = torch.full((n, K), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros(n, K, dtype=torch.long)
    comp[:, :vocab.num_levels] = sid_ids
    cmask[:, :vocab.num_levels] = 1
    if end:
        comp[:, vocab.num_levels] = tok.eos_token_id
        cmask[:, vocab.num_levels] = 1
    return enc["input_ids"], enc["attention_mask"], comp, cmask, codes


def make_grpo(trainer_cls, tok, model, tmp_path, **kw):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, logging_steps=1, bf16=False,
                      beta=kw.pop("beta", 0.0), temperature=kw.pop("temperature", 1.0), seed=0)
    ds = Dataset.from_list([{"prompt": "x"}] * 4)
    return trainer_cls(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                       train_dataset=ds, processing_class=tok, **kw)


def brute_force(model, input_ids, attn, K, vocab, support, temperature=1.0):
    """Per-token log-probs from the full ``[B, S, V]`` logits (the definition the tests hold the fast paths to)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, -K - 1:-1].float() / temperature
    comp = input_ids[:, -K:]
    L = vocab.num_levels
    out = torch.zeros(comp.shape)
    codes, valid = vocab.completion_codes(comp, attn[:, -K:])
    assert bool(valid.all())
    for b in range(comp.shape[0]):
        node = 0
        for p in range(K):
            if not attn[b, -K + p]:
                continue
            z = logits[b, p]
            if support == "vocab":
                out[b, p] = torch.log_softmax(z, -1)[comp[b, p]]
            elif p < L:
                if support == "trie":
                    kids, nodes, ok = vocab.trie.children(torch.tensor([node]), p)
                    allowed = vocab.level_token_ids[p][kids[0][ok[0]]]
                else:
                    allowed = vocab.level_token_ids[p]
                lp = torch.log_softmax(z[allowed], -1)
                out[b, p] = lp[(allowed == comp[b, p]).nonzero()[0, 0]]
                node = int(vocab.trie.next_node(torch.tensor([node]), codes[b, p:p + 1], level=p))
    return out


# ------------------------------------------------------------------------------------------------ tests
def test_vocabulary_from_minionerec_index_keeps_shared_sids():
    tok, _, vocab, item_ids, _ = tiny_setup()
    assert vocab.num_levels == 3 and len(item_ids) == vocab.trie.num_items
    assert vocab.trie.num_leaves < vocab.trie.num_items  # items sharing a SID share a leaf
    text = vocab.text(vocab.trie.leaf_sid(vocab.trie.item_leaf[:5]))
    import json
    index = json.loads((FIXTURE / "Office_Products.index.json").read_text())
    assert text == ["".join(index[i]) for i in item_ids[:5]]
    assert torch.equal(vocab.codes_from_text(text), vocab.trie.leaf_sid(vocab.trie.item_leaf[:5]))
    with pytest.raises(ValueError, match="no token '<a_999>'"):
        SIDVocabulary.from_tokenizer(tok, torch.tensor([[999, 0, 0]]))
    with pytest.raises(ValueError, match=r"strings\[1\].*level 2, expected level 1"):
        sid_codes_from_strings(["<a_1><b_2>", "<a_1><c_2>"])


@pytest.mark.parametrize("support", ["trie", "level", "vocab"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_match_full_logits(support, temperature):
    tok, model, vocab, _, rows = tiny_setup(seed=1)
    p_ids, p_mask, comp, cmask, _ = batch(tok, vocab, rows, n=5)
    ids, attn = torch.cat([p_ids, comp], 1), torch.cat([p_mask, cmask], 1)
    cmask[1, vocab.num_levels] = 0  # one row without its end token
    attn = torch.cat([p_mask, cmask], 1)
    K = comp.shape[1]
    with torch.no_grad():
        ours, ent = sid_per_token_logps(model, ids, attn, K, vocab, support=support, temperature=temperature,
                                        compute_entropy=True, chunk_rows=2)
    ref = brute_force(model, ids, attn, K, vocab, support, temperature)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ent.shape == ours.shape and bool((ent >= -1e-6).all())
    if support != "vocab":  # forced tokens after the SID carry nothing
        assert bool((ours[:, vocab.num_levels:] == 0).all()) and bool((ent[:, vocab.num_levels:] == 0).all())


def test_vocab_logps_and_entropy_equal_trl(tmp_path):
    """support='vocab' gives TRL's own per-token log-probs and entropies (its fused LM head, same model)."""
    tok, model, vocab, _, rows = tiny_setup(seed=2)
    base = make_grpo(trl.GRPOTrainer, tok, model, tmp_path / "a", temperature=0.9)
    p_ids, p_mask, comp, cmask, _ = batch(tok, vocab, rows, n=6, seed=3)
    ids, attn = torch.cat([p_ids, comp], 1), torch.cat([p_mask, cmask], 1)
    K = comp.shape[1]
    with torch.no_grad():
        want, want_ent, _ = base._get_per_token_logps_and_entropies(model, ids, attn, K, compute_entropy=True)
        got, got_ent = sid_per_token_logps(model, ids, attn, K, vocab, support="vocab", temperature=0.9,
                                           compute_entropy=True)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got_ent, want_ent.float(), rtol=1e-5, atol=2e-6)


def test_grpo_step_with_sid_logps_equals_trl_loss_and_grads(tmp_path):
    """One GRPO loss + backward through SIDGRPOTrainer(sid_support='vocab') equals TRL's, gradients included."""
    tok, model_a, vocab, _, rows = tiny_setup(seed=4)
    _, model_b, _, _, _ = tiny_setup(seed=4)
    # beta > 0: TRL loads its reference model from the policy's path
    model_a.save_pretrained(tmp_path / "init")
    for m in (model_a, model_b):
        m.config._name_or_path = str(tmp_path / "init")
    kw = dict(beta=0.05, temperature=0.8)
    ours = make_grpo(SIDGRPOTrainer, tok, model_b, tmp_path / "b", sid_vocab=vocab, sid_support="vocab", **kw)
    theirs = make_grpo(trl.GRPOTrainer, tok, model_a, tmp_path / "a", **kw)
    p_ids, p_mask, comp, cmask, _ = batch(tok, vocab, rows, n=4, seed=5)
    g = torch.Generator().manual_seed(6)
    K = comp.shape[1]
    inputs = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": comp, "completion_mask": cmask,
              "advantages": torch.randn(4, generator=g), "num_items_in_batch": cmask.sum(),
              "old_per_token_logps": -torch.rand(4, K, generator=g) * 3,
              "ref_per_token_logps": -torch.rand(4, K, generator=g) * 3}
    losses = []
    for trainer, model in ((theirs, model_a), (ours, model_b)):
        model.train()
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model_b.parameters())


def test_trie_logps_never_form_vocab_logits(monkeypatch):
    """support='trie' touches the full head only through the SID rows: no [*, V] matmul output anywhere."""
    tok, model, vocab, _, rows = tiny_setup(seed=5)
    p_ids, p_mask, comp, cmask, _ = batch(tok, vocab, rows, n=3)
    ids, attn = torch.cat([p_ids, comp], 1), torch.cat([p_mask, cmask], 1)
    V = model.get_output_embeddings().weight.shape[0]
    hidden = completion_hidden(model, ids, attn, comp.shape[1])
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(out.shape[-1])
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    lp, _ = sid_per_token_logps(model, ids, attn, comp.shape[1], vocab, support="trie", hidden=hidden,
                                compute_entropy=True)
    monkeypatch.undo()
    assert seen and V not in seen and max(seen) == max(vocab.codes_per_level)
    lp.sum().backward()
    assert model.get_output_embeddings().weight.grad[vocab.sid_token_ids].abs().sum() > 0


def test_invalid_completion_is_named():
    tok, model, vocab, _, rows = tiny_setup()
    p_ids, p_mask, comp, cmask, _ = batch(tok, vocab, rows, n=3)
    comp[2, 1] = comp[2, 0]  # level-0 token where level 1 belongs
    ids, attn = torch.cat([p_ids, comp], 1), torch.cat([p_mask, cmask], 1)
    with pytest.raises(ValueError, match=r"completion rows 2 do not start with a catalogue SID"):
        sid_per_token_logps(model, ids, attn, comp.shape[1], vocab)
    with pytest.raises(ValueError, match="support must be one of"):
        sid_per_token_logps(model, ids, attn, comp.shape[1], vocab, support="full")


def test_index_errors_name_the_file_and_item(tmp_path):
    import json

    tok, _, _, _, _ = tiny_setup()
    bad = tmp_path / "X.index.json"
    bad.write_text(json.dumps({"7": ["<a_1>", "<b_2>", "<c_3>"], "9": ["<a_1>", "<c_2>", "<b_3>"]}))
    with pytest.raises(ValueError, match=r"X.index.json: item '9': .*level 2, expected level 1"):
        SIDVocabulary.from_index(tok, bad)
    bad.write_text(json.dumps({"7": ["<a_1>", "<b_2>", "<c_3>"], "9": ["<a_1>", "<b_2>"]}))
    with pytest.raises(ValueError, match=r"item '9' has a 2-level SID, item '7' has 3 levels"):
        SIDVocabulary.from_index(tok, bad)
