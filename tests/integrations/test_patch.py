"""fastft.patch: undo restores the instance bit for bit, PEFT LoRA layers run fastft's op on their own
parameters (PEFT's adapter switching still works), a LoRA'd head (untied and tied) trains fused, the
generic path checks its loss, a torch.compile'd model and fastft.AutoModelForCausalLM."""
from __future__ import annotations

import copy
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastft  # noqa: E402
import fastft.integrations.causal_lm_loss as hf_loss  # noqa: E402
import fastft.nn.lora as nn_lora  # noqa: E402
from fastft.integrations.patch import get_handle  # noqa: E402
from patch_models import GENERIC_CONFIGS, batches, one_thread, tiny_model  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _peft(model, targets, dropout=0.0):
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                            target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return peft_model


def _loss_and_grads(model, ids, labels, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _instance_state(model):
    """Per module: its instance attribute names, parameter objects and training flag."""
    return {name: (sorted(vars(m)), [id(p) for p in m.parameters(recurse=False)], m.training)
            for name, m in model.named_modules()}


@pytest.mark.parametrize("case", ["llama", "llama-peft-lora-head", "tied-peft-lora-head", "gpt2-peft"])
def test_undo_restores_the_instance_bit_for_bit(case):
    if case == "gpt2-peft":
        model = _peft(tiny_model("gpt2"), ["c_attn", "lm_head"])
    elif case == "tied-peft-lora-head":
        model = _peft(tiny_model("llama", tie_word_embeddings=True), ["q_proj", "down_proj", "lm_head"])
    elif case == "llama-peft-lora-head":
        model = _peft(tiny_model("llama"), ["q_proj", "v_proj", "gate_proj", "lm_head"])
    else:
        model = tiny_model("llama")
    ids, labels = batches(1)[0]
    before_state = _instance_state(model)
    model.eval()
    with torch.no_grad():
        before_logits = model(input_ids=ids).logits
    model.train()
    before_out, before_grads = _loss_and_grads(model, ids, labels)

    handle = fastft.patch(model)
    assert get_handle(model) is handle and handle.report.fused("loss")
    patched_out, _ = _loss_and_grads(model, ids, labels)
    assert patched_out.logits is None  # the fused path ran
    handle.undo()
    handle.undo()  # idempotent

    assert get_handle(model) is None and not hf_loss.is_patched(model)
    assert _instance_state(model) == before_state
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before_logits)
    model.train()
    after_out, after_grads = _loss_and_grads(model, ids, labels)
    assert torch.equal(after_out.loss, before_out.loss) and torch.equal(after_out.logits, before_out.logits)
    assert after_grads.keys() == before_grads.keys()
    assert all(torch.equal(after_grads[n], before_grads[n]) for n in before_grads)


def test_deepcopy_of_a_patched_model_is_patched_and_undoes_itself():
    model = _peft(tiny_model("llama"), ["q_proj", "lm_head"])
    ids, labels = batches(1)[0]
    stock_out, _ = _loss_and_grads(model, ids, labels)
    handle = fastft.patch(model)
    copied = copy.deepcopy(model)  # e.g. a reference or EMA model
    with torch.no_grad():
        copied.get_base_model().lm_head.lora_B["default"].weight.zero_()  # its own weights, not the original's
    copy_handle = get_handle(copied)
    assert copy_handle is not handle and copy_handle.model is copied.get_base_model()
    out = copied(input_ids=ids, labels=labels)
    assert out.logits is None and not torch.allclose(out.loss, stock_out.loss)
    copy_handle.undo()
    assert get_handle(model) is handle and get_handle(copied) is None
    patched_out, _ = _loss_and_grads(model, ids, labels)  # the original is still patched, on its own weights
    assert patched_out.logits is None
    torch.testing.assert_close(patched_out.loss, stock_out.loss, rtol=1e-5, atol=1e-6)
    assert copied(input_ids=ids, labels=labels).logits is not None
    handle.undo()


def test_peft_lora_layers_run_fastft_on_the_same_parameters(monkeypatch):
    from peft.utils import get_peft_model_state_dict

    model = _peft(tiny_model("llama"), "all-linear")
    params_before = [(n, id(p)) for n, p in model.named_parameters()]
    saved_before = get_peft_model_state_dict(model)
    ids, labels = batches(1)[0]
    stock_out, stock_grads = _loss_and_grads(model, ids, labels)

    handle = fastft.patch(model, loss=False, layers=False)
    # the same parameter objects: an optimizer built before the patch keeps working
    assert [(n, id(p)) for n, p in model.named_parameters()] == params_before
    calls = []
    real = nn_lora.lora_linear
    monkeypatch.setattr(nn_lora, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, grads = _loss_and_grads(model, ids, labels)
    assert len(calls) == len(handle.report.fused("lora")) == 14  # 7 linears x 2 layers
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-6, atol=1e-6)
    for name in stock_grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    # PEFT's own API still sees its layers: disabling the adapter (a TRL reference model) and saving
    calls.clear()
    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=ids).logits
    assert not calls  # PEFT's own forward ran (adapter off)
    handle.undo()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(disabled, model(input_ids=ids).logits, rtol=0, atol=0)
    saved = get_peft_model_state_dict(model)
    assert saved.keys() == saved_before.keys()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_head_trains_fused(tied, monkeypatch):
    # lm_head LoRA with dropout: the fused head draws PEFT's dropout mask (same place, same RNG state)
    model = _peft(tiny_model("llama", tie_word_embeddings=tied), ["lm_head"], dropout=0.1)
    head = model.get_base_model().lm_head
    assert (head.weight is model.get_base_model().model.embed_tokens.weight) == tied
    ids, labels = batches(1)[0]
    stock_out, stock_grads = _loss_and_grads(model, ids, labels, seed=3)

    handle = fastft.patch(model)
    assert "LoRA'd head fused" in handle.report.fused("loss")[0].detail
    assert ("tied to the input embedding" in handle.report.fused("loss")[0].detail) == tied
    calls = []
    real = hf_loss.fused_linear_cross_entropy
    monkeypatch.setattr(hf_loss, "fused_linear_cross_entropy",
                        lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    out, grads = _loss_and_grads(model, ids, labels, seed=3)
    assert out.logits is None and calls == [torch.Size([head.out_features, head.in_features + 4])]  # [W | B]
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock_grads.keys() and any("lm_head.lora_A" in n for n in grads)
    for name in stock_grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    handle.undo()


def test_fastft_lora_head_trains_fused():
    from fastft.tuners import LoraConfig, apply

    model = tiny_model("qwen3")
    apply(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        model.lm_head.lora_B.normal_(0, 0.05)
    ids, labels = batches(1)[0]
    stock_out, stock_grads = _loss_and_grads(model, ids, labels)
    handle = fastft.patch(model)
    assert "LoRA'd head fused" in handle.report.fused("loss")[0].detail
    assert {e.detail for e in handle.report.fused("lora")} == {"fastft LoRALinear (fused already)"}
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock_grads.keys() and "lm_head.lora_A" in grads
    for name in stock_grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    handle.undo()


@pytest.mark.parametrize("model_type", sorted(GENERIC_CONFIGS))
def test_unnamed_architectures_take_the_checked_generic_path(model_type):
    model = tiny_model(model_type)
    ids, labels = batches(1)[0]
    stock_out, stock_grads = _loss_and_grads(model, ids, labels)
    handle = fastft.patch(model)
    assert handle.report.path == "generic" and handle.report.fused("loss"), str(handle.report)
    assert handle.report.stock("layers")  # no fused-layer table entry: layers stay stock, and say so
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-5, atol=1e-6)
    for name in stock_grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    handle.undo()


def test_generic_path_checks_the_loss_on_one_batch():
    model = tiny_model("llama")
    model.config.model_type = "toy_llama"  # not in fastft's table
    ids, labels = batches(1)[0]
    stock_out, _ = _loss_and_grads(model, ids, labels)
    rng = torch.get_rng_state()
    handle = fastft.patch(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the check does not move the caller's RNG
    assert handle.report.path == "generic"
    assert "checked on one batch" in handle.report.fused("loss")[0].detail
    out, _ = _loss_and_grads(model, ids, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-5, atol=1e-6)
    handle.undo()

    # A config naming a logit transform that this forward does not apply: the check fails, loss stays stock
    model.config.logit_scale = 2.0
    handle = fastft.patch(model)
    (entry,) = handle.report.stock("loss")
    assert "one-batch check failed" in entry.detail and not hf_loss.is_patched(model)
    assert model(input_ids=ids, labels=labels).logits is not None
    handle.undo()


def test_adapters_and_gradient_checkpointing():
    from fastft.tuners import BottleneckConfig, apply

    model = tiny_model("mistral")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply(model, BottleneckConfig(adapter_size=8, dropout=0.0))
    ids, labels = batches(1)[0]
    stock_out, stock_grads = _loss_and_grads(model, ids, labels)
    handle = fastft.patch(model)
    assert "fused already" in handle.report.fused("bottleneck")[0].detail
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.logits is None and any("fastft_adapter" in n for n in grads)
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-5, atol=1e-6)
    for name in stock_grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    handle.undo()


def test_gpt2_conv1d_lora_left_stock_with_the_reason_loss_fused():
    model = _peft(tiny_model("gpt2"), ["c_attn", "c_fc"])
    handle = fastft.patch(model)
    text = str(handle.report)
    assert handle.report.fused("loss") and not handle.report.fused("lora")
    assert len(handle.report.stock("lora")) == 4 and "Conv1D" in text and "STOCK" in text
    handle.undo()


def test_torch_compiled_model_is_patched_through_orig_mod():
    model = tiny_model("qwen2")
    ids, labels = batches(1)[0]
    compiled = torch.compile(model, backend="eager")
    stock = compiled(input_ids=ids, labels=labels)
    handle = fastft.patch(compiled)
    assert handle.model is model and "torch.compile" in handle.report.fused("model")[0].detail
    fused = compiled(input_ids=ids, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    handle.undo()
    assert compiled(input_ids=ids, labels=labels).logits is not None


def test_auto_model_loads_and_patches(tmp_path):
    tiny_model("gemma2").save_pretrained(tmp_path)
    model = fastft.AutoModelForCausalLM.from_pretrained(tmp_path, layers=False)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    report = get_handle(model).report
    assert report.fused("loss") and report.stock("layers")[0].detail == "layers=False"
    ids, labels = batches(1)[0]
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, stock(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    config_built = fastft.AutoModelForCausalLM.from_config(stock.config)
    assert get_handle(config_built).report.fused("layers")


def test_hf_trainer_with_a_patched_model_matches_stock(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = batches(6, distinct=6, batch=1)
    data = datasets.Dataset.from_dict({"input_ids": [ids[0].tolist() for ids, _ in pairs],
                                       "labels": [labels[0].tolist() for _, labels in pairs]})

    def run(patched):
        model = tiny_model("qwen2")
        handle = fastft.patch(model) if patched else None
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                              learning_rate=3e-3, disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], handle

    stock, _ = run(False)
    fused, handle = run(True)
    assert handle.report.fused("loss") and len(stock) == 3
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(stock), rtol=1e-5, atol=1e-6)


def test_generation_of_a_patched_peft_model():
    model = _peft(tiny_model("llama"), ["q_proj", "v_proj", "lm_head"])
    ids = batches(1)[0][0]
    stock = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    handle = fastft.patch(model)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False), stock)
    handle.undo()


def test_bad_input():
    with pytest.raises(TypeError, match="transformers model"):
        fastft.patch(torch.nn.Linear(2, 2))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="check must be"):
        fastft.patch(model, check="sometimes")
    handle = fastft.patch(model, verbose=False)
    assert fastft.patch(model) is handle and handle.latest.entries == []  # nothing new to patch
    handle.undo()
    with pytest.raises(TypeError, match="from_pretrained"):
        fastft.AutoModelForCausalLM()


@pytest.mark.parametrize("layers, fused_kind", [("norms", "RMSNorm"), ("mlp", "SwiGLU")])
def test_layers_one_kind_only(layers, fused_kind):
    """layers="norms" / "mlp" (the kernel stack's norms / mlp parts): only that kind runs fused, the other
    kind is listed stock with the reason, and the outputs are the stock model's."""
    model = tiny_model("llama")
    ids, labels = batches(1)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    handle = fastft.patch(model, loss=False, lora=False, layers=layers)
    fused = handle.report.fused("layers")
    assert fused and all(fused_kind in e.detail for e in fused)
    assert any(e.detail == f"layers={layers!r}" for e in handle.report.stock("layers"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    handle.undo()
    with pytest.raises(ValueError, match="layers must be"):
        fastft.patch(model, layers="norm")
