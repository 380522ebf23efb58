"""fastft.tuners.lora against PEFT 0.21 on a tiny LlamaForCausalLM built from a config (no downloads)."""
import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fastft.tuners import count_parameters, get_handle, unwrap  # noqa: E402
from fastft.tuners import lora as fl  # noqa: E402
from fastft.nn.lora import LoRALinear  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 11))


def _peft_model(base, **kw):
    kw.setdefault("target_modules", ALL)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # B = 0 at init would hide any mistake in the B path
    return model


def _lora_grads(model):
    """{module path: (dA, dB)} for PEFT and fastft layers alike."""
    out = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, LoRALinear):
            out[name] = (m.lora_A.grad, m.lora_B.grad)
        elif isinstance(m, peft.tuners.lora.LoraLayer):
            out[name] = (m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad)
    return out


def _check_step(ref_model, model, ids):
    o_ref = ref_model(ids, labels=ids)
    o = model(ids, labels=ids)
    torch.testing.assert_close(o.logits, o_ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.loss, o_ref.loss, atol=1e-6, rtol=1e-6)
    o_ref.loss.backward()
    o.loss.backward()
    g_ref, g = _lora_grads(ref_model), _lora_grads(model)
    assert set(g) == set(g_ref) and len(g) == 2 * len(ALL)
    for name in g:
        for a, b in zip(g[name], g_ref[name]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_apply_lora_matches_peft_step(base_model, ids, tmp_path):
    """Logits, loss and every A/B gradient match PEFT's, with the adapter PEFT saved loaded into fastft."""
    ref = _peft_model(base_model)
    ref.save_pretrained(tmp_path)
    model = fl.load(copy.deepcopy(base_model), str(tmp_path), trainable=True).model
    assert len(fl.lora_layers(model)) == 2 * len(ALL)
    assert count_parameters(model) == ref.get_nb_trainable_parameters()
    _check_step(ref, model, ids)


def test_fastft_saved_adapter_loads_in_peft(base_model, ids, tmp_path):
    model = fl.apply(copy.deepcopy(base_model), fl.LoraConfig(r=4, lora_alpha=8, target_modules=ALL)).model
    with torch.no_grad():
        for layer in fl.lora_layers(model).values():
            layer.lora_B.normal_(std=0.2)
    get_handle(model, "lora").save(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    # and the keys are exactly the ones PEFT itself writes for this adapter
    from safetensors.torch import load_file

    ref_dir = tmp_path / "peft"
    ref.save_pretrained(ref_dir)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(load_file(ref_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("kw", [dict(bias="all"), dict(bias="lora_only"), dict(modules_to_save=["lm_head"])],
                         ids=["bias-all", "bias-lora_only", "modules_to_save"])
def test_saved_keys_match_peft(kw, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, attention_bias=True)
    base = transformers.LlamaForCausalLM(cfg)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **kw))
    ref.save_pretrained(tmp_path / "peft")
    model = fl.apply(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **kw)).model
    get_handle(model, "lora").save(str(tmp_path / "ff"))
    assert set(load_file(tmp_path / "ff" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert count_parameters(model)[0] == ref.get_nb_trainable_parameters()[0]
    fl.load(copy.deepcopy(base), str(tmp_path / "peft"))  # every PEFT key finds its place


def test_from_peft_same_parameters_and_outputs(base_model, ids):
    ref = _peft_model(base_model, lora_dropout=0.1)
    model = copy.deepcopy(ref)
    before = {n: p for n, p in model.named_parameters() if "lora_" in n}
    fl.from_peft(model)
    layers = fl.lora_layers(model)
    assert len(layers) == 2 * len(ALL) and all(l.lora_dropout == 0.1 for l in layers.values())
    after = {id(p) for n, p in model.named_parameters()}
    assert all(id(p) in after for p in before.values())  # the very same Parameter objects
    ref.eval()
    model.eval()
    _check_step(ref, model, ids)


def test_merge_and_unload(base_model, ids):
    ref = _peft_model(base_model)
    expected = ref(ids).logits
    model = fl.from_peft(copy.deepcopy(ref)).model
    merged = fl.merge_and_unload(model)
    assert not fl.lora_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def _peft_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


@pytest.mark.parametrize("wrapped", [True, False], ids=["PeftModel", "inner-model"])
def test_merge_and_unload_peft_layers(base_model, ids, wrapped):
    """PEFT's own LoRA layers are merged too, with the logits of PEFT's merge_and_unload."""
    ref = _peft_model(base_model)
    expected = copy.deepcopy(ref).merge_and_unload()(ids).logits
    assert not torch.allclose(expected, base_model(ids).logits, atol=1e-3)  # the merge changes the model
    merged = fl.merge_and_unload(copy.deepcopy(ref) if wrapped else copy.deepcopy(ref).get_base_model())
    assert not _peft_layers(merged) and type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_rejects_other_peft_layers(base_model):
    other = peft.get_peft_model(copy.deepcopy(base_model), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                          feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="not a LoRA layer"):
        fl.merge_and_unload(other.get_base_model())


@pytest.mark.parametrize("target_modules", [ALL, "all-linear"])
def test_same_seed_same_init_as_peft(base_model, target_modules):
    """lora.apply draws PEFT's random numbers in PEFT's order: one seed, the same adapters, and the
    generator left in the same state."""
    torch.manual_seed(123)
    ref = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(r=4, target_modules=target_modules))
    after_ref = torch.rand(4)
    torch.manual_seed(123)
    model = fl.apply(copy.deepcopy(base_model), fl.LoraConfig(r=4, target_modules=target_modules)).model
    after = torch.rand(4)
    ref_layers = {n: m for n, m in ref.get_base_model().named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = fl.lora_layers(model)
    assert set(layers) == set(ref_layers)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, ref_layers[name].lora_A["default"].weight), name
        assert torch.equal(layer.lora_B, ref_layers[name].lora_B["default"].weight), name
    assert torch.equal(after, after_ref)


def test_targets_all_linear_regex_exclude(base_model):
    model = fl.apply(copy.deepcopy(base_model), fl.LoraConfig(target_modules="all-linear")).model
    names = set(fl.lora_layers(model))
    assert len(names) == 2 * len(ALL) and "lm_head" not in names
    model = fl.apply(copy.deepcopy(base_model),
                          fl.LoraConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=["layers.1.self_attn.v_proj"])).model
    assert sorted(fl.lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                             "model.layers.1.self_attn.q_proj"]
    ref = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(target_modules="all-linear"))
    ours = fl.apply(copy.deepcopy(base_model), peft.LoraConfig(target_modules="all-linear")).model
    assert count_parameters(ours) == ref.get_nb_trainable_parameters()
    default = fl.apply(copy.deepcopy(base_model), fl.LoraConfig()).model  # PEFT's llama default: q, v
    assert len(fl.lora_layers(default)) == 4


def test_bad_configs(base_model):
    with pytest.raises(ValueError, match="r "):
        fl.LoraConfig(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        fl.LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias"):
        fl.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="matches no module"):
        fl.apply(copy.deepcopy(base_model), fl.LoraConfig(target_modules=["q_proj", "q_porj"]))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        fl.apply(copy.deepcopy(base_model), fl.LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="use_dora"):
        fl.apply(copy.deepcopy(base_model), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    model = fl.apply(copy.deepcopy(base_model), fl.LoraConfig(target_modules=["q_proj"])).model
    with pytest.raises(ValueError, match="already"):
        fl.apply(model, fl.LoraConfig(target_modules=["v_proj"]))


def test_training_step_changes_only_adapters(base_model, ids):
    model = fl.apply(copy.deepcopy(base_model), fl.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                   target_modules="all-linear")).model
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert any(torch.count_nonzero(l.lora_B) for l in fl.lora_layers(model).values())
