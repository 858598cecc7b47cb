import json

import pytest
import torch

from gflowgr_core.sid.tokens import SIDTokenMap, parse_sid_token, sid_token


def _tiny_tokenizer(with_specials=("pad", "eos")):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, "<s>": 3, "[SEP]": 4, "hello": 5, "world": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {"pad": "[PAD]", "eos": "</s>", "bos": "<s>", "sep": "[SEP]"}
    kwargs = {f"{k}_token": names[k] for k in with_specials}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **kwargs)


def test_token_string_helpers():
    assert sid_token(0, 12) == "<a_12>" and sid_token(3, 0) == "<d_0>"
    assert parse_sid_token("<c_255>") == (2, 255)
    for bad in ("<a12>", "<A_1>", "<a_01>", "<a_-3>", "a_1", "<ab_1>", "<a_1>x"):
        with pytest.raises(ValueError, match="malformed SID token"):
            parse_sid_token(bad)
    with pytest.raises(ValueError, match="at most 26|has no letter"):
        sid_token(26, 0)


def test_from_scratch_layout():
    m = SIDTokenMap.from_scratch((3, 5, 2))
    assert (m.pad_id, m.bos_id, m.eos_id, m.sep_id) == (0, 1, 2, 3)
    assert m.vocab_size == 4 + 10
    assert m.level_token_ids[0].tolist() == [4, 5, 6]
    assert m.level_token_ids[1].tolist() == [7, 8, 9, 10, 11]
    assert m.level_token_ids[2].tolist() == [12, 13]
    assert torch.equal(m.sid_token_ids, torch.arange(4, 14))
    assert m.level_of_token.tolist() == [-1] * 4 + [0] * 3 + [1] * 5 + [2] * 2
    assert m.code_of_token.tolist() == [-1] * 4 + [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert m.code_offsets == [0, 3, 8, 10]


def test_encode_decode_round_trip_with_batch_dims():
    m = SIDTokenMap.from_scratch((7, 256, 3, 11))
    gen = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, k, (5, 6), generator=gen) for k in m.codes_per_level], dim=-1)
    ids = m.encode(codes)
    assert ids.shape == (5, 6, 4) and ids.dtype == torch.long
    assert torch.equal(m.level_of_token[ids], torch.arange(4).expand_as(ids))
    assert torch.equal(m.decode(ids), codes)
    # A single SID (1-D) works too.
    assert m.decode(m.encode(torch.tensor([6, 255, 2, 10]))).tolist() == [6, 255, 2, 10]


def test_encode_rejects_out_of_range_and_bad_shapes():
    m = SIDTokenMap.from_scratch((4, 4))
    with pytest.raises(ValueError, match=r"code 4 at position \(1, 1\) is outside level 1's range \[0, 4\)"):
        m.encode(torch.tensor([[0, 0], [1, 4]]))
    with pytest.raises(ValueError, match=r"code -1 at position \(0,\)"):
        m.encode(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]"):
        m.encode(torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match="integer"):
        m.encode(torch.tensor([0.0, 1.0]))


def test_decode_rejects_specials_wrong_levels_and_out_of_vocab():
    m = SIDTokenMap.from_scratch((4, 4))
    good = m.encode(torch.tensor([[1, 2]]))
    swapped = good.flip(-1)
    with pytest.raises(ValueError, match=r"position \(0, 0\) is a level-1 SID token; expected a level-0"):
        m.decode(swapped)
    with pytest.raises(ValueError, match=r"token id 2 at position \(0, 1\) is not a SID token"):
        m.decode(torch.tensor([[good[0, 0].item(), m.eos_id]]))
    with pytest.raises(ValueError, match=r"token id 99 .* outside the vocabulary \[0, 12\)"):
        m.decode(torch.tensor([99, 8]))


def test_scratch_save_load_and_device_copy(tmp_path):
    m = SIDTokenMap.from_scratch((5, 6, 7))
    m.save(tmp_path / "tokens.json")
    back = SIDTokenMap.load(tmp_path / "tokens.json")
    assert back.codes_per_level == m.codes_per_level and back.vocab_size == m.vocab_size
    assert torch.equal(back.sid_token_ids, m.sid_token_ids)
    assert torch.equal(back.level_of_token, m.level_of_token)
    assert back.kind == "scratch"
    moved = m.to("cpu")
    assert torch.equal(moved.decode(moved.encode(torch.tensor([4, 5, 6]))), torch.tensor([4, 5, 6]))


def test_load_reports_bad_files(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"codes_per_level": [2]}))
    with pytest.raises(ValueError, match=r"t.json: SID token map is missing field"):
        SIDTokenMap.load(bad)
    data = SIDTokenMap.from_scratch((2, 2)).to_dict()
    data["level_token_ids"][1] = [4, 5]  # collides with level 0
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"t.json: invalid SID token map: two SID codes map to the same"):
        SIDTokenMap.load(bad)


def test_constructor_validation():
    with pytest.raises(ValueError, match="also SID token ids"):
        SIDTokenMap(codes_per_level=(2,), level_token_ids=[torch.tensor([0, 1])], vocab_size=4,
                    pad_id=0, bos_id=2, eos_id=3, sep_id=3)
    with pytest.raises(ValueError, match=r"level 0 has 3 token ids, expected K_0 = 2"):
        SIDTokenMap(codes_per_level=(2,), level_token_ids=[torch.tensor([4, 5, 6])], vocab_size=8,
                    pad_id=0, bos_id=1, eos_id=2, sep_id=3)
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size=5\)"):
        SIDTokenMap(codes_per_level=(2,), level_token_ids=[torch.tensor([4, 5])], vocab_size=5,
                    pad_id=0, bos_id=1, eos_id=2, sep_id=3)


def test_for_pretrained_adds_letter_tokens_and_missing_specials():
    tok = _tiny_tokenizer(with_specials=("pad", "eos"))
    base_len = len(tok)
    m = SIDTokenMap.for_pretrained(tok, (3, 4))
    assert m.kind == "pretrained"
    assert m.pad_id == tok.pad_token_id and m.eos_id == tok.eos_token_id
    # bos and sep were absent: dedicated special tokens were added for them.
    assert tok.convert_ids_to_tokens([m.bos_id, m.sep_id]) == ["<|sid_bos|>", "<|sid_sep|>"]
    assert m.vocab_size == len(tok) == base_len + 7 + 2
    assert tok.convert_ids_to_tokens(m.level_token_ids[1].tolist()) == ["<b_0>", "<b_1>", "<b_2>", "<b_3>"]
    # The tokenizer now splits SID strings into exactly these ids, adjacent or space-separated.
    ids = tok("hello <a_2><b_3> world <a_0> <b_1>", add_special_tokens=False)["input_ids"]
    assert ids == [5, m.level_token_ids[0][2].item(), m.level_token_ids[1][3].item(), 6,
                   m.level_token_ids[0][0].item(), m.level_token_ids[1][1].item()]
    sids = m.decode(torch.tensor([ids[1:3], ids[4:6]]))
    assert sids.tolist() == [[2, 3], [0, 1]]
    assert m.level_of_token[5].item() == -1 and m.code_of_token[5].item() == -1
    m.check_tokenizer(tok)


def test_for_pretrained_uses_existing_specials_and_is_idempotent(tmp_path):
    tok = _tiny_tokenizer(with_specials=("pad", "eos", "bos", "sep"))
    m = SIDTokenMap.for_pretrained(tok, (2, 2, 2))
    assert (m.pad_id, m.eos_id, m.bos_id, m.sep_id) == (1, 2, 3, 4)
    size = len(tok)
    again = SIDTokenMap.for_pretrained(tok, (2, 2, 2))
    assert len(tok) == size
    assert torch.equal(again.sid_token_ids, m.sid_token_ids)

    tok.save_pretrained(tmp_path / "tok")
    m.save(tmp_path / "tokens.json")
    from transformers import PreTrainedTokenizerFast

    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    m2 = SIDTokenMap.load(tmp_path / "tokens.json")
    m2.check_tokenizer(tok2)
    assert m2.kind == "pretrained" and torch.equal(m2.sid_token_ids, m.sid_token_ids)
    other = _tiny_tokenizer()
    other.add_tokens(["zzz"])  # shifts every id the SID tokens would get
    SIDTokenMap.for_pretrained(other, (2, 2, 2))
    with pytest.raises(ValueError, match=r"tokenizer maps '<a_0>' to id \d+, the SID token map expects"):
        m2.check_tokenizer(other)


def _tiny_model(vocab_size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def test_resize_grows_and_never_shrinks():
    tok = _tiny_tokenizer()
    base = len(tok)
    m = SIDTokenMap.for_pretrained(tok, (8, 8))
    model = _tiny_model(base)
    old_rows = model.get_input_embeddings().weight[:base].detach().clone()
    assert m.resize(model) == m.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == m.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == m.vocab_size
    assert torch.equal(model.get_input_embeddings().weight[:base], old_rows)
    # The model accepts SID ids now.
    ids = m.encode(torch.tensor([[1, 2], [7, 0]])).reshape(1, -1)
    assert model(input_ids=ids).logits.shape == (1, 4, m.vocab_size)

    big = _tiny_model(m.vocab_size + 50)
    assert m.resize(big) == m.vocab_size + 50
    assert big.get_input_embeddings().weight.shape[0] == m.vocab_size + 50
