"""Every behaviour the tuner base promises, for every method (PEFT's test-matrix style): apply, save and
load, trainability after load, remove, merge, state_dict, report, and the methods composed on one model.
Method-specific checks (PEFT's numbers, targeting, sites) are in the test_<method>*.py files beside this."""
import pytest
import torch
from torch import nn

from fastft import tuners
from fastft.tuners import BottleneckConfig, LoraConfig, PrefixTuningConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

CONFIGS = {  # factories: LoraConfig is PEFT-like, mutable (apply records the base model's name in it)
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "bottleneck": lambda: BottleneckConfig(adapter_size=8, dropout=0.0),
}
METHODS = list(CONFIGS)
FILES = {"lora": ("adapter_config.json", "adapter_model.safetensors"),
         "prefix": ("adapter_config.json", "adapter_model.safetensors"),
         "bottleneck": ("bottleneck_config.json", "bottleneck_model.safetensors")}


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _logits(model):
    ids, mask = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _perturb(handle, seed=2):
    """Away from the initial values (LoRA's B starts at zero, an adapter near the identity), so a wrong
    save, load or remove shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters().values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)


def _trainable(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [True, False], ids=["fastft", "stock"])
@pytest.mark.parametrize("method", METHODS)
def test_apply_trains_only_the_method(method, fused):
    model = _model()
    before = {id(p) for p in model.parameters()}
    handle = tuners.apply(model, CONFIGS[method](), fused=fused)
    assert handle.method == method and handle.fused == fused and handle.root is model
    own = handle.parameters()
    assert own and _trainable(handle.model) == {id(p) for p in own.values()}
    assert not any(id(p) in before for p in own.values())  # the method's own new parameters
    assert tuners.handles(model) == {method: handle}
    ids, mask = _batch()
    handle.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert {n for n, p in own.items() if p.grad is not None} == set(own)
    assert all(p.grad is None for p in handle.root.parameters() if id(p) in before)


@pytest.mark.parametrize("fused", [True, False], ids=["fastft", "stock"])
@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_gives_the_same_outputs(method, fused, tmp_path):
    """Saved by fastft's or the stock implementation, loaded by fastft's: the same outputs."""
    model = _model()
    handle = tuners.apply(model, CONFIGS[method](), fused=fused)
    _perturb(handle)
    want = _logits(handle.model)
    assert not torch.allclose(want, _logits(_model()), atol=1e-4)  # the method changes the model
    handle.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES[method])
    fresh = _model()
    loaded = tuners.load(fresh, tmp_path)  # the folder says which method
    assert loaded.method == method and loaded.fused
    torch.testing.assert_close(_logits(fresh), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_load_is_frozen_unless_trainable(method, tmp_path):
    """The same default for every method: frozen, as PEFT's is_trainable=False."""
    tuners.apply(_model(), CONFIGS[method]()).save(tmp_path)
    frozen_model = _model()
    frozen = tuners.load(frozen_model, tmp_path)
    assert not _trainable(frozen_model) and frozen.parameters()
    trained_model = _model()
    trained = tuners.load(trained_model, tmp_path, trainable=True)
    assert _trainable(trained_model) == {id(p) for p in trained.parameters().values()}
    own = getattr(tuners, method)  # each method's own load has the same default
    assert own.load.__kwdefaults__["trainable"] is False


@pytest.mark.parametrize("fused", [True, False], ids=["fastft", "stock"])
@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_base_model_exactly(method, fused):
    model = _model()
    model.lm_head.weight.requires_grad_(False)  # flags from before are kept, whatever they were
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keys, want = list(model.state_dict()), _logits(model)
    handle = tuners.apply(model, CONFIGS[method](), fused=fused)
    _perturb(handle)
    assert handle.remove() is model
    assert handle.model is model and not tuners.handles(model)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    assert list(model.state_dict()) == keys and [(p, p.requires_grad) for p in model.parameters()] == flags
    with pytest.raises(ValueError, match="not applied"):
        handle.remove()
    tuners.apply(model, CONFIGS[method](), fused=fused)  # and it can be applied again


@pytest.mark.parametrize("method", METHODS)
def test_merge(method):
    """LoRA folds into the base weights (plain nn.Linear layers, the same outputs); the others cannot."""
    model = _model()
    handle = tuners.apply(model, CONFIGS[method]())
    _perturb(handle)
    want = _logits(model)
    if method != "lora":
        with pytest.raises(TypeError, match="cannot be merged"):
            handle.merge()
        return
    assert handle.merge() is model and not tuners.handles(model) and not tuners.lora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_is_what_save_writes(method, tmp_path):
    handle = tuners.apply(_model(), CONFIGS[method]())
    state = handle.state_dict()
    handle.save(tmp_path)
    saved = load_file(tmp_path / FILES[method][1])
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    if method == "lora":  # PEFT's keys
        assert all(k.startswith("base_model.model.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)
        assert len(state) == 2 * 7 * 2  # 7 linears x 2 layers, A and B
    elif method == "prefix":  # PEFT's: the prefix itself, [tokens, layers * 2 * key/value width]
        assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    else:  # the adapters' names in the model
        assert set(state) == set(handle.parameters()) and all(".fastft_adapter." in k for k in state)


@pytest.mark.parametrize("method", METHODS)
def test_report(method):
    model = _model()
    handle = tuners.apply(model, CONFIGS[method]())
    report = handle.report
    own = sum(p.numel() for p in handle.parameters().values())
    assert report.method == method and report.trainable_params == own
    assert report.all_params == sum(p.numel() for p in model.parameters())
    assert len(report.modules) == {"lora": 14, "prefix": 1, "bottleneck": 4}[method]
    assert str(report).startswith(f"{method}: trainable params: {own:,} || all params: ")


@pytest.mark.parametrize("order", [METHODS, METHODS[::-1]], ids=["lora-prefix-bottleneck", "reversed"])
def test_methods_compose(order):
    """LoRA + prefix + bottleneck on one model: the base stays frozen, each method's parameters train
    whichever came first, and removing one leaves the others as they were."""
    model = _model()
    base = {id(p) for p in model.parameters()}
    want = _logits(model)
    handles = {m: tuners.apply(model, CONFIGS[m]()) for m in order}
    owned = {m: {id(p) for p in h.parameters().values()} for m, h in handles.items()}
    assert _trainable(model) == set().union(*owned.values()) and not _trainable(model) & base
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    got = {id(p) for p in model.parameters() if p.grad is not None}
    assert all(owned[m] & got for m in METHODS) and not got & base
    handles[order[1]].remove()
    assert _trainable(model) == owned[order[0]] | owned[order[2]]
    for m in (order[0], order[2]):
        handles[m].remove()
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_one_per_method_and_bad_configs():
    model = _model()
    with pytest.raises(ValueError, match="matches no module"):
        tuners.apply(model, LoraConfig(target_modules=["q_porj"]))
    assert not tuners.handles(model) and all(p.requires_grad for p in model.parameters())  # nothing left behind
    tuners.apply(model, CONFIGS["prefix"]())
    with pytest.raises(ValueError, match="already has fastft prefix"):
        tuners.apply(model, CONFIGS["prefix"]())
    with pytest.raises(TypeError, match="LoraConfig, BottleneckConfig, PrefixTuningConfig"):
        tuners.apply(model, {"r": 4})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tuners.apply("model", CONFIGS["lora"]())


def test_load_says_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json or bottleneck_config.json"):
        tuners.load(_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match="IA3"):
        tuners.load(_model(), tmp_path)


def test_peft_model_unwraps_to_its_base():
    import peft

    model = _model()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert tuners.unwrap(wrapped) is model and tuners.unwrap(model) is model


@pytest.mark.parametrize("method", METHODS)
def test_a_deepcopy_runs_its_own_copy_of_the_method(method):
    """A copy of a tuned model (e.g. a frozen reference model in RLHF) computes with its own parameters."""
    import copy

    model = _model()
    handle = tuners.apply(model, CONFIGS[method]())
    _perturb(handle)
    copied = copy.deepcopy(model)
    want = _logits(copied)
    with torch.no_grad():
        for p in handle.parameters().values():
            p.zero_()
    torch.testing.assert_close(_logits(copied), want, rtol=0, atol=0)
