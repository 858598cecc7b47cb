"""SIDTrieLogitsProcessor inside stock ``generate``: identical to a dict-trie ``prefix_allowed_tokens_fn``.

Tiny random decoder-only (Qwen2, Llama) and encoder-decoder (T5) models from config, random tries; greedy,
sampling and beam search (1..20 beams, with and without ``num_return_sequences``) must give exactly the same
sequences, per-step scores and sequence scores as the reference, and every sequence must be a catalogue SID
followed by the end token.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, T5Config, T5ForConditionalGeneration

from gflowgr_core.hf_processor import SIDTrieLogitsProcessor, sids_from_sequences
from gflowgr_core.model.policy import build_tiny_causal_lm
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie

PAD, BOS, EOS, SEP = 0, 1, 2, 3


def random_catalogue(seed: int, cpl=(5, 4, 6), n_items=40):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (n_items,), generator=g) for k in cpl], dim=1)
    return codes, Trie.build(codes, cpl), SIDTokenMap.from_scratch(cpl)


def dict_trie(codes: torch.Tensor, tokens: SIDTokenMap) -> dict[tuple, list[int]]:
    """Reference: token prefix -> sorted allowed next tokens (a complete SID -> [EOS])."""
    ids = tokens.encode(codes).tolist()
    table: dict[tuple, set] = {}
    for sid in ids:
        for level in range(len(sid)):
            table.setdefault(tuple(sid[:level]), set()).add(sid[level])
        table[tuple(sid)] = {EOS}
    return {k: sorted(v) for k, v in table.items()}


def prefix_fn(table: dict, prompt_length: int):
    def fn(batch_id, ids):
        # Unknown prefixes (rows already finished) get EOS, as the processor does.
        return table.get(tuple(ids[prompt_length:].tolist()), [EOS])
    return fn


class LogSoftmax(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return torch.log_softmax(scores.float(), dim=-1).to(scores.dtype)


def decoder_only(arch: str, vocab: int, seed: int = 0):
    model = build_tiny_causal_lm(vocab, hidden=32, layers=2, heads=2, arch=arch, seed=seed)
    # Larger head weights make the next-token distributions peaked, so beam ranking is not near-uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.eval()


def tiny_t5(vocab: int, seed: int = 0):
    config = T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2,
                      num_heads=2, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
                      tie_word_embeddings=False, dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.eval()


def prompts(tokens: SIDTokenMap, batch: int, seed: int):
    """Left-padded ``[BOS] + random SID tokens + [SEP]`` prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    width = 9
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(2, width + 1, (1,), generator=g))
        body = tokens.sid_token_ids[torch.randint(0, tokens.sid_token_ids.numel(), (n - 2,), generator=g)]
        ids[b, width - n:] = torch.cat([torch.tensor([BOS]), body, torch.tensor([SEP])])
        mask[b, width - n:] = 1
    return ids, mask


def run_generate(model, ids, mask, processors, prefix=None, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, logits_processor=processors,
                              prefix_allowed_tokens_fn=prefix, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, **kw)


def assert_same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores)
    for a, b in zip(out.scores, ref.scores):
        assert torch.equal(a, b)
    if getattr(ref, "sequences_scores", None) is not None:
        assert torch.equal(out.sequences_scores, ref.sequences_scores)


def assert_valid_sids(sequences, start, codes, tokens, trie, scores=None):
    L = trie.num_levels
    got = sids_from_sequences(sequences, start, tokens)
    live = torch.ones(len(got), dtype=torch.bool) if scores is None else torch.isfinite(scores)
    assert bool(live.any())
    assert bool(trie.contains(got[live].clamp_min(0)).all()) and bool((got[live] >= 0).all())
    assert bool((sequences[live, start + L] == EOS).all())
    catalogue = {tuple(c) for c in codes.tolist()}
    assert {tuple(c) for c in got[live].tolist()} <= catalogue


SETTINGS = [
    dict(num_beams=1, do_sample=False),
    dict(num_beams=2, do_sample=False),
    dict(num_beams=5, do_sample=False, num_return_sequences=5),
    dict(num_beams=7, do_sample=False, num_return_sequences=3),
    dict(num_beams=20, do_sample=False),
    dict(num_beams=20, do_sample=False, num_return_sequences=20),
    dict(num_beams=1, do_sample=True, num_return_sequences=4),
    dict(num_beams=4, do_sample=True, num_return_sequences=2),
]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_decoder_only_matches_prefix_fn(arch, renormalize, setting):
    codes, trie, tokens = random_catalogue(seed=len(arch) + setting["num_beams"])
    model = decoder_only(arch, tokens.vocab_size)
    ids, mask = prompts(tokens, batch=3, seed=setting["num_beams"])
    P = ids.shape[1]
    L = trie.num_levels
    ours = SIDTrieLogitsProcessor(trie, tokens, prompt_length=P, renormalize=renormalize)
    ref_procs = [LogSoftmax()] if renormalize else []
    out = run_generate(model, ids, mask, [ours], max_new_tokens=L + 1, **setting)
    ref = run_generate(model, ids, mask, ref_procs, prefix_fn(dict_trie(codes, tokens), P),
                       max_new_tokens=L + 1, **setting)
    assert_same(out, ref)
    assert_valid_sids(out.sequences, P, codes, tokens, trie, getattr(out, "sequences_scores", None))
    # Stateless: prompt_length=None (trailing SID run after SEP) gives the same result.
    auto = SIDTrieLogitsProcessor(trie, tokens, renormalize=renormalize)
    assert_same(run_generate(model, ids, mask, [auto], max_new_tokens=L + 1, **setting), ref)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("setting", SETTINGS[::2] + [SETTINGS[5]],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_encoder_decoder_matches_prefix_fn(renormalize, setting):
    codes, trie, tokens = random_catalogue(seed=100 + setting["num_beams"], cpl=(6, 3, 4, 5), n_items=50)
    model = tiny_t5(tokens.vocab_size, seed=setting["num_beams"])
    ids, mask = prompts(tokens, batch=2, seed=7)
    L = trie.num_levels
    # The decoder starts from decoder_start_token_id: the SID begins at decoder position 1.
    ours = SIDTrieLogitsProcessor(trie, tokens, prompt_length=1, renormalize=renormalize)
    ref_procs = [LogSoftmax()] if renormalize else []
    out = run_generate(model, ids, mask, [ours], max_new_tokens=L + 1, **setting)
    ref = run_generate(model, ids, mask, ref_procs, prefix_fn(dict_trie(codes, tokens), 1),
                       max_new_tokens=L + 1, **setting)
    assert_same(out, ref)
    assert_valid_sids(out.sequences, 1, codes, tokens, trie, getattr(out, "sequences_scores", None))
    auto = SIDTrieLogitsProcessor(trie, tokens, renormalize=renormalize)
    assert_same(run_generate(model, ids, mask, [auto], max_new_tokens=L + 1, **setting), ref)


def test_beams_exceed_catalogue():
    """More beams than catalogue SIDs: the live results are still valid and equal to the reference."""
    codes, trie, tokens = random_catalogue(seed=3, cpl=(3, 2, 2), n_items=6)
    model = decoder_only("qwen2", tokens.vocab_size)
    ids, mask = prompts(tokens, batch=2, seed=1)
    P = ids.shape[1]
    setting = dict(num_beams=20, num_return_sequences=20, do_sample=False, max_new_tokens=4)
    out = run_generate(model, ids, mask, [SIDTrieLogitsProcessor(trie, tokens, prompt_length=P)], **setting)
    ref = run_generate(model, ids, mask, [], prefix_fn(dict_trie(codes, tokens), P), **setting)
    assert_same(out, ref)
    assert_valid_sids(out.sequences, P, codes, tokens, trie, out.sequences_scores)
    # HF starts the extra beams of a row at -1e9, so beams beyond the catalogue come back with scores near
    # -1e9 (copies of real SIDs); the ones above that are distinct SIDs, at most one per leaf.
    real = (out.sequences_scores > -1e8).view(2, 20)
    sids = sids_from_sequences(out.sequences, P, tokens).view(2, 20, -1)
    for b in range(2):
        kept = [tuple(s) for s in sids[b][real[b]].tolist()]
        assert 0 < len(kept) == len(set(kept)) <= trie.num_leaves


def test_renormalized_scores_are_child_log_softmax():
    """renormalize=True: each step's scores are the log-softmax over the trie children of the prefix."""
    codes, trie, tokens = random_catalogue(seed=5)
    g = torch.Generator().manual_seed(0)
    L = trie.num_levels
    proc = SIDTrieLogitsProcessor(trie, tokens, prompt_length=2, renormalize=True)
    sids = codes[torch.randint(0, len(codes), (6,), generator=g)]
    prefix_tokens = tokens.encode(sids)
    for level in range(L + 1):
        input_ids = torch.cat([torch.full((6, 1), BOS), torch.full((6, 1), SEP), prefix_tokens[:, :level]], 1)
        scores = torch.randn(6, tokens.vocab_size + 3, generator=g)
        out = proc(input_ids, scores)
        assert out.shape == scores.shape
        if level == L:
            assert bool((out[:, EOS] == 0).all())
            assert bool(torch.isinf(out[:, torch.arange(out.shape[1]) != EOS]).all())
            continue
        for r in range(6):
            allowed = dict_trie(codes, tokens)[tuple(prefix_tokens[r, :level].tolist())]
            expect = torch.full_like(scores[r], float("-inf"))
            expect[allowed] = torch.log_softmax(scores[r, allowed], dim=0)
            torch.testing.assert_close(out[r], expect)


def test_masking_keeps_raw_scores_and_dtype():
    codes, trie, tokens = random_catalogue(seed=6)
    proc = SIDTrieLogitsProcessor(trie, tokens, prompt_length=1)
    sid = tokens.encode(codes[:4])
    input_ids = torch.cat([torch.full((4, 1), SEP), sid[:, :1]], 1)
    scores = torch.randn(4, tokens.vocab_size).to(torch.bfloat16)
    out = proc(input_ids, scores)
    assert out.dtype == torch.bfloat16
    table = dict_trie(codes, tokens)
    for r in range(4):
        allowed = table[(int(sid[r, 0]),)]
        assert torch.equal(out[r, allowed], scores[r, allowed])
        keep = torch.zeros(tokens.vocab_size, dtype=torch.bool)
        keep[allowed] = True
        assert bool(torch.isinf(out[r, ~keep]).all())


def test_invalid_prefix_gets_end_token_or_raises_when_strict():
    codes, trie, tokens = random_catalogue(seed=8, cpl=(4, 4, 4), n_items=5)
    catalogue = {tuple(c) for c in codes.tolist()}
    missing = next((a, b) for a in range(4) for b in range(4)
                   if not any(c[:2] == (a, b) for c in catalogue) and any(c[0] == a for c in catalogue))
    bad = tokens.encode(torch.tensor([[missing[0], missing[1], 0]]))[:, :2]
    good = tokens.encode(codes[:1])[:, :2]
    input_ids = torch.cat([torch.full((2, 1), SEP), torch.cat([good, bad])], 1)
    scores = torch.zeros(2, tokens.vocab_size)
    for proc in (SIDTrieLogitsProcessor(trie, tokens, prompt_length=1),
                 SIDTrieLogitsProcessor(trie, tokens)):
        out = proc(input_ids, scores)
        assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [EOS]
        assert not bool(torch.isfinite(out[0, EOS]))
        strict = proc.with_prompt_length(proc.prompt_length)
        strict.strict = True
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            strict(input_ids, scores)


def test_trailing_run_longer_than_a_sid_is_dead():
    """prompt_length=None with a prompt ending in SID tokens cannot locate the SID: only EOS is allowed."""
    codes, trie, tokens = random_catalogue(seed=9)
    sid = tokens.encode(codes[:2])
    input_ids = torch.cat([sid, sid], 1)  # 6 trailing SID tokens > L = 3
    out = SIDTrieLogitsProcessor(trie, tokens)(input_ids, torch.zeros(2, tokens.vocab_size))
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [EOS, EOS]


def test_explicit_token_ids_and_wider_vocab():
    """Per-level token ids that are not contiguous, in a vocabulary wider than the SID block."""
    cpl = (3, 4)
    codes = torch.tensor([[0, 1], [0, 3], [2, 0], [1, 2], [2, 3]])
    trie = Trie.build(codes, cpl)
    level_ids = [torch.tensor([50, 10, 30]), torch.tensor([11, 41, 21, 60])]
    proc = SIDTrieLogitsProcessor(trie, level_ids, end_token_id=7, prompt_length=1)
    scores = torch.zeros(3, 100)
    out = proc(torch.tensor([[99], [99], [99]]), scores)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [10, 30, 50]
    out = proc(torch.tensor([[99, 50], [99, 30], [99, 10]]), scores)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [41, 60]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [11, 60]
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [21]
    out = proc(torch.tensor([[99, 50, 41]]), scores[:1])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [7]
    got = sids_from_sequences(torch.tensor([[99, 30, 60, 7], [99, 10, 41, 7]]), 1, level_ids, trie)
    assert got.tolist() == [[2, 3], [-1, -1]]  # (1, 1) is not a catalogue SID


def test_construction_errors():
    codes, trie, tokens = random_catalogue(seed=10)
    with pytest.raises(ValueError, match="end_token_id is required"):
        SIDTrieLogitsProcessor(trie, tokens.level_token_ids)
    with pytest.raises(ValueError, match="levels of SID token ids"):
        SIDTrieLogitsProcessor(trie, tokens.level_token_ids[:2], end_token_id=EOS)
    with pytest.raises(ValueError, match="level 1: 3 token ids"):
        SIDTrieLogitsProcessor(trie, [tokens.level_token_ids[0], tokens.level_token_ids[1][:3],
                                      tokens.level_token_ids[2]], end_token_id=EOS)
    with pytest.raises(ValueError, match="also a SID token"):
        SIDTrieLogitsProcessor(trie, tokens, end_token_id=int(tokens.sid_token_ids[0]))
    with pytest.raises(ValueError, match="share a token id"):
        SIDTrieLogitsProcessor(trie, [tokens.level_token_ids[0], tokens.level_token_ids[0][:4],
                                      tokens.level_token_ids[2]], end_token_id=EOS)
    proc = SIDTrieLogitsProcessor(trie, tokens, prompt_length=5)
    with pytest.raises(ValueError, match="fewer than prompt_length=5"):
        proc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, tokens.vocab_size))
    with pytest.raises(ValueError, match="does not contain the SID tokens"):
        proc(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 10))


def test_float_token_ids_raise_naming_the_argument():
    """Float ids would be truncated to other tokens (5.7 -> 5) without a word: every id argument refuses them."""
    cpl = (3, 4)
    codes = torch.tensor([[0, 1], [0, 3], [2, 0], [1, 2], [2, 3]])
    trie = Trie.build(codes, cpl)
    level_ids = [torch.tensor([50, 10, 30]), torch.tensor([11, 41, 21, 60])]
    floats = [level_ids[0], torch.tensor([11.0, 41.7, 21.0, 60.0])]
    with pytest.raises(TypeError, match=r"tokens\[1\] must hold integer token ids, got a torch.float32"):
        SIDTrieLogitsProcessor(trie, floats, end_token_id=7)
    with pytest.raises(TypeError, match=r"tokens\[0\] must hold integer token ids, got a torch.float"):
        SIDTrieLogitsProcessor(trie, [[50.0, 10.0, 30.0], [11, 41, 21, 60]], end_token_id=7)
    with pytest.raises(TypeError, match=r"tokens\[0\] must hold integer token ids, got a torch.bool"):
        SIDTrieLogitsProcessor(trie, [torch.ones(3, dtype=torch.bool), level_ids[1]], end_token_id=7)
    with pytest.raises(TypeError, match=r"end_token_id must be an integer, got float 7.5"):
        SIDTrieLogitsProcessor(trie, level_ids, end_token_id=7.5)
    with pytest.raises(TypeError, match=r"prompt_length must be an integer or None, got float 1.0"):
        SIDTrieLogitsProcessor(trie, level_ids, end_token_id=7, prompt_length=1.0)
    # Integer ids in any integer form are taken as they are.
    proc = SIDTrieLogitsProcessor(trie, [[50, 10, 30], torch.tensor([11, 41, 21, 60], dtype=torch.int32)],
                                  end_token_id=torch.tensor(7), prompt_length=1)
    assert proc.end_token_id == 7
    with pytest.raises(TypeError, match=r"prompt_length must be an integer or None, got float"):
        proc.with_prompt_length(2.5)
    scores = torch.zeros(1, 100)
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor of token ids, got torch.float32"):
        proc(torch.tensor([[99.0, 50.4]]), scores)
    out = proc(torch.tensor([[99, 50]], dtype=torch.int32), scores)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [41, 60]
    seqs = torch.tensor([[99, 30, 60, 7]])
    with pytest.raises(TypeError, match=r"sequences must be an integer tensor of token ids, got torch.float32"):
        sids_from_sequences(seqs.float(), 1, level_ids, trie)
    with pytest.raises(TypeError, match=r"level_token_ids\[1\] must hold integer token ids"):
        sids_from_sequences(seqs, 1, floats, trie)
    with pytest.raises(TypeError, match=r"prompt_length must be an integer, got float"):
        proc.sids(seqs, prompt_length=1.0)
    assert proc.sids(seqs).tolist() == [[2, 3]]


def test_no_host_sync_in_a_step():
    """A step never moves data to the host (checked with CUDA's sync debug mode when a GPU is present)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to detect host synchronisations")
    codes, trie, tokens = random_catalogue(seed=11)
    trie = trie.to("cuda")
    for proc in (SIDTrieLogitsProcessor(trie, tokens, prompt_length=1, renormalize=True),
                 SIDTrieLogitsProcessor(trie, tokens)):
        input_ids = torch.cat([torch.full((4, 1), SEP), tokens.encode(codes[:4])[:, :2]], 1).cuda()
        scores = torch.randn(4, tokens.vocab_size, device="cuda")
        proc(input_ids, scores)  # builds the device tables
        torch.cuda.set_sync_debug_mode("error")
        try:
            proc(input_ids, scores)
        finally:
            torch.cuda.set_sync_debug_mode("default")
