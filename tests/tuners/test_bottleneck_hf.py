"""fastft.tuners.bottleneck: insertion into Hugging Face Llama and BERT models built from tiny configs.
(What every method does alike, apply / save / load / remove / trainability, is in test_tuners.py.)"""
import json

import pytest
import torch
from torch import nn

from fastft.tuners import BottleneckConfig, bottleneck, find_sites

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    return ids


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("make", [_llama, _bert])
def test_sites_and_freezing(make, placement, per_layer):
    model = make()
    report = bottleneck.apply(model, BottleneckConfig(adapter_size=8, placement=placement, dropout=0.0)).report
    assert len(report.modules) == 2 * per_layer and report.method == "bottleneck"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fastft_adapter." in n for n in trainable)
    expected = sum(p.numel() for n, p in model.named_parameters() if ".fastft_adapter." in n)
    assert report.trainable_params == expected == 2 * per_layer * (64 * 8 * 2 + 8 + 64)
    assert "trainable params" in str(report)
    if make is _bert:  # before the residual LayerNorm of BertSelfOutput / BertOutput
        names = [n for n, _ in model.named_modules() if n.endswith("fastft_adapter")]
        assert all(n.endswith(("attention.output.fastft_adapter", "output.fastft_adapter")) for n in names)


@pytest.mark.parametrize("make", [_llama, _bert])
def test_adapter_changes_output_and_removal_restores_exactly(make):
    model = make().eval()
    ids = _batch()
    keys = list(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = _out(model, ids)
    handle = bottleneck.apply(model, BottleneckConfig(adapter_size=8, placement="houlsby"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "fastft_adapter" in n and "up.weight" in n:
                p.normal_(std=0.5)
        during = _out(model, ids)
    assert (during - before).abs().max() > 1e-3
    handle.remove()
    with torch.no_grad():
        after = _out(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_new_adapters_start_near_identity():
    model = _llama().eval()
    ids = _batch()
    with torch.no_grad():
        before = _out(model, ids)
        bottleneck.apply(model, BottleneckConfig(adapter_size=8))
        after = _out(model, ids)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_llama_loss_falls_and_only_adapters_change():
    model = _llama()
    bottleneck.apply(model, BottleneckConfig(adapter_size=16, placement="houlsby", dropout=0.1))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "fastft_adapter" not in n}
    ids = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_bert_trains():
    model = _bert()
    bottleneck.apply(model, BottleneckConfig(adapter_size=8, placement="pfeiffer", activation="gelu"))
    ids = _batch()
    target = torch.randn(2, 9, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = (model(input_ids=ids).last_hidden_state - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_load_roundtrip(tmp_path):
    model = _llama().eval()
    handle = bottleneck.apply(model, BottleneckConfig(adapter_size=8, placement="houlsby", activation="silu", dropout=0.0,
                                                      scale=2.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "fastft_adapter" in n:
                p.normal_(std=0.3)
    ids = _batch()
    with torch.no_grad():
        want = _out(model, ids)
    handle.save(tmp_path)
    assert (tmp_path / "bottleneck_config.json").exists() and (tmp_path / "bottleneck_model.safetensors").exists()
    assert not (tmp_path / "adapter_config.json").exists()  # PEFT's name: PEFT would try to read it
    fresh = _llama().eval()
    assert len(bottleneck.load(fresh, tmp_path).report.modules) == 4
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh, ids), want, rtol=1e-6, atol=1e-6)


def test_load_rejects_other_hidden_size(tmp_path):
    model = _llama()
    bottleneck.apply(model, BottleneckConfig(adapter_size=8)).save(tmp_path)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        bottleneck.load(transformers.LlamaForCausalLM(cfg), tmp_path)


def test_torch_compile_llama_with_adapters():
    torch._dynamo.reset()
    model = _llama().eval()
    bottleneck.apply(model, BottleneckConfig(adapter_size=8, dropout=0.0))
    ids = _batch()
    with torch.no_grad():
        want = _out(model, ids)
        got = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    model = _llama()
    with pytest.raises(ValueError, match="adapter_size"):
        BottleneckConfig(adapter_size=0)
    with pytest.raises(ValueError, match="placement"):
        BottleneckConfig(placement="parallel")
    with pytest.raises(ValueError, match="activation"):
        BottleneckConfig(activation="tanhh")
    with pytest.raises(TypeError, match="BottleneckConfig"):
        bottleneck.apply(model, {"adapter_size": 8})
    with pytest.raises(ValueError, match=r"found no transformer blocks in Sequential.*self_attn"):
        bottleneck.apply(nn.Sequential(nn.Linear(4, 4)))
    handle = bottleneck.apply(model)
    with pytest.raises(ValueError, match="already has"):
        bottleneck.apply(model)
    handle.remove()
    with pytest.raises(ValueError, match="not applied"):
        handle.remove()


def test_find_sites_hidden_sizes():
    sites = find_sites(_bert())
    assert [s.kind for s in sites] == ["attention", "ffn"] * 2
    assert all(s.hidden_size == 64 for s in sites)


def test_reads_the_folders_written_under_peft_s_file_names(tmp_path):
    """Folders saved before the format had its own names (adapter_config.json, adapter_model.safetensors)."""
    model = _llama().eval()
    handle = bottleneck.apply(model, BottleneckConfig(adapter_size=8, dropout=0.0))
    with torch.no_grad():
        for p in handle.parameters().values():
            p.normal_(std=0.3)
        want = _out(model, _batch())
    handle.save(tmp_path)
    (tmp_path / "bottleneck_config.json").rename(tmp_path / "adapter_config.json")
    (tmp_path / "bottleneck_model.safetensors").rename(tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format"] == bottleneck.FORMAT
    fresh = _llama().eval()
    bottleneck.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh, _batch()), want, rtol=0, atol=0)


def test_eager_block_is_the_fused_one():
    """fused=False (the stock baseline) computes the same block in eager torch; chosen at construction."""
    fast, eager = _llama().eval(), _llama().eval()
    fast_handle = bottleneck.apply(fast, BottleneckConfig(adapter_size=8, dropout=0.0))
    eager_handle = bottleneck.apply(eager, BottleneckConfig(adapter_size=8, dropout=0.0), fused=False)
    assert all(a.fused for a in fast_handle.adapters()) and not any(a.fused for a in eager_handle.adapters())
    with torch.no_grad():
        for p, q in zip(fast_handle.parameters().values(), eager_handle.parameters().values()):
            q.copy_(p.normal_(std=0.3))
        torch.testing.assert_close(_out(eager, _batch()), _out(fast, _batch()), rtol=1e-5, atol=1e-5)
