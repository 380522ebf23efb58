"""fastft.tuners.prefix: prefix tuning matches PEFT's logits and round-trips through PEFT's adapter format.
(What every method does alike, apply / save / load / remove / trainability, is in test_tuners.py.)"""
import pytest
import torch

from fastft.tuners import PrefixTuningConfig
from fastft.tuners import prefix

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _config(kv_heads=2):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=kv_heads, vocab_size=97)


def _base(kv_heads=2):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config(kv_heads)).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _peft_model(base_state, proj, kv_heads=2):
    model = transformers.LlamaForCausalLM(_config(kv_heads)).eval()
    model.load_state_dict(base_state)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=proj,
                                  encoder_hidden_size=32)
    return peft.get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("proj", [False, True])
def test_logits_match_peft(proj, kv_heads):
    base = _base(kv_heads)
    pm = _peft_model(base.state_dict(), proj, kv_heads)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_(std=0.5)
    ids, mask = _inputs()
    encoder = prefix.apply(base, PrefixTuningConfig(5, prefix_projection=proj, encoder_hidden_size=32)).encoder
    encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())  # same names as PEFT's PrefixEncoder
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = base(input_ids=ids, attention_mask=mask).logits
        want_labels = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
        got_labels = base(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_labels, want_labels, rtol=1e-6, atol=1e-6)


def test_loss_falls():
    model = _base()
    encoder = prefix.apply(model, PrefixTuningConfig(4)).encoder
    ids, mask = _inputs()
    opt = torch.optim.AdamW(encoder.parameters(), lr=5e-2)
    losses = []
    model.train()
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_peft_loads_our_save_and_we_load_peft_save(tmp_path):
    base = _base()
    state = base.state_dict()
    ids, mask = _inputs()
    handle = prefix.apply(base, PrefixTuningConfig(5, prefix_projection=True, encoder_hidden_size=32))
    with torch.no_grad():
        ours = base(input_ids=ids, attention_mask=mask).logits
    handle.save(tmp_path / "ours")
    fresh = transformers.LlamaForCausalLM(_config()).eval()
    fresh.load_state_dict(state)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ours, rtol=1e-6, atol=1e-6)

    pm = _peft_model(state, False)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_(std=0.5)
        want = pm(input_ids=ids, attention_mask=mask).logits
    pm.save_pretrained(tmp_path / "peft")
    mine = transformers.LlamaForCausalLM(_config()).eval()
    mine.load_state_dict(state)
    prefix.load(mine, tmp_path / "peft")
    assert not any(p.requires_grad for p in mine.parameters())
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-6, atol=1e-6)


def test_stock_prefix_is_peft_and_saves_the_same_files(tmp_path):
    """fused=False is PEFT's prefix tuning (handle.model is the PeftModel); with the same prefix parameters
    it computes what fastft's does, and both handles write the same files."""
    ids, mask = _inputs()
    fast, stock = _base(), _base()
    fast_handle = prefix.apply(fast, PrefixTuningConfig(5))
    stock_handle = prefix.apply(stock, PrefixTuningConfig(5), fused=False)
    assert isinstance(stock_handle.model, peft.PeftModel) and stock_handle.root is stock
    stock_handle.encoder.load_state_dict(fast_handle.encoder.state_dict())
    assert list(stock_handle.parameters()) == ["prompt_encoder.default.embedding.weight"]
    with torch.no_grad():
        torch.testing.assert_close(stock_handle.model(input_ids=ids, attention_mask=mask).logits,
                                   fast(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)
    fast_handle.save(tmp_path / "fast")
    stock_handle.save(tmp_path / "stock")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "stock" / name).read_bytes(), name
    assert stock_handle.remove() is stock and stock_handle.model is stock


def test_errors(tmp_path):
    model = _base()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(0)
    with pytest.raises(ValueError, match="config"):
        prefix.apply(torch.nn.Linear(2, 2), PrefixTuningConfig(4))
    with pytest.raises(TypeError, match="PrefixTuningConfig"):
        prefix.apply(model, {"num_virtual_tokens": 4})
    prefix.apply(model, PrefixTuningConfig(4)).save(tmp_path)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97))
    with pytest.raises(ValueError, match="token_dim"):
        prefix.load(other, tmp_path)
