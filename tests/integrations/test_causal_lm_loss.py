"""patch_causal_lm_loss on tiny causal LMs built from configs (no downloads): same loss and gradients
as stock transformers, logits never built for a labelled forward (unless asked), unpatch restores exactly."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastft import backend as fb  # noqa: E402
from fastft.integrations.causal_lm_loss import is_patched, patch_causal_lm_loss, unpatch  # noqa: E402

VOCAB = 97


def tiny_llama(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg = transformers.LlamaConfig(**{**kw, **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def batch(b=2, t=11, pad=3):
    ids = torch.randint(0, VOCAB, (b, t))
    labels = ids.clone()
    labels[0, :pad] = -100  # e.g. a masked prompt
    return ids, labels


def loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(stock, fused, rtol=1e-5, atol=1e-6):
    (s_out, s_grads), (f_out, f_grads) = stock, fused
    torch.testing.assert_close(f_out.loss, s_out.loss, rtol=rtol, atol=atol)
    assert f_out.loss.dtype == s_out.loss.dtype == torch.float32
    assert s_grads.keys() == f_grads.keys()
    for name in s_grads:
        torch.testing.assert_close(f_grads[name], s_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("num_items", [None, 13], ids=["mean", "num_items_in_batch"])
def test_llama_same_loss_and_grads_without_logits(backend, num_items):
    if not fb.status(backend)[0]:
        pytest.skip(fb.status(backend)[1])
    model = tiny_llama()
    ids, labels = batch()
    kw = dict(input_ids=ids, labels=labels)
    if num_items is not None:
        kw["num_items_in_batch"] = torch.tensor(num_items)
    stock = loss_and_grads(model, **kw)
    assert stock[0].logits is not None
    patch_causal_lm_loss(model)
    with fb.use(backend):
        fused = loss_and_grads(model, **kw)
    assert fused[0].logits is None  # never built in training
    assert_same(stock, fused)


def test_shift_labels_return_logits_and_tuple_output():
    model = tiny_llama()
    ids, labels = batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    stock = loss_and_grads(model, input_ids=ids, labels=labels, shift_labels=shift)
    patch_causal_lm_loss(model)
    fused = loss_and_grads(model, input_ids=ids, labels=labels, shift_labels=shift, return_logits=True)
    assert_same(stock, fused)
    torch.testing.assert_close(fused[0].logits, stock[0].logits, rtol=1e-5, atol=1e-6)
    # return_dict=False: (loss, logits, ...) in stock; logits dropped when not asked for
    s_tuple = copy.deepcopy(model)
    unpatch(s_tuple)
    ref = s_tuple(input_ids=ids, labels=labels, return_dict=False)
    got = model(input_ids=ids, labels=labels, return_dict=False)
    assert len(got) == len(ref) - 1
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)


def test_eval_with_labels_is_fused_and_generation_is_stock(caplog):
    """A labelled forward is fused in eval mode too (what from_pretrained returns), with a one-time log
    line; logits on request; generation untouched."""
    model = tiny_llama().eval()
    ids, labels = batch()
    with torch.no_grad():
        stock = model(input_ids=ids, labels=labels)
        patch_causal_lm_loss(model)
        with caplog.at_level("INFO", logger="fastft.integrations.causal_lm_loss"):
            fused = model(input_ids=ids, labels=labels)
            again = model(input_ids=ids, labels=labels, return_logits=True)
        gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert fused.logits is None  # the fused path ran: the stock one always returns logits
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.logits, stock.logits, rtol=1e-5, atol=1e-6)
    assert len(caplog.records) == 1 and "fused linear cross-entropy" in caplog.records[0].message  # once
    assert gen.shape == (1, 7)


def test_bf16_autocast_training_step():
    model = tiny_llama()
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = loss_and_grads(model, input_ids=ids, labels=labels)
    patch_causal_lm_loss(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fused[0].logits is None
    # same bf16 GEMMs and fp32 CE math; bf16 rounding of the logit gradient may differ by an ulp
    assert_same(stock, fused, rtol=2e-2, atol=2e-3)


def test_tied_embeddings_and_unpatch_restores_exactly():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before_model, before_head = dict(vars(model)), dict(vars(model.lm_head))
    default_loss = model.loss_function
    ids, labels = batch()
    stock = loss_and_grads(model, input_ids=ids, labels=labels)
    patch_causal_lm_loss(model)
    patch_causal_lm_loss(model)  # idempotent
    assert is_patched(model)
    fused = loss_and_grads(model, input_ids=ids, labels=labels)
    assert_same(stock, fused)
    unpatch(model)
    assert not is_patched(model)
    assert vars(model).keys() == before_model.keys() and vars(model.lm_head).keys() == before_head.keys()
    assert model.loss_function is default_loss
    again = loss_and_grads(model, input_ids=ids, labels=labels)
    assert again[0].logits is not None
    assert_same(stock, again, rtol=0, atol=0)


def test_gemma2_softcap_is_honoured():
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).train()
    ids, labels = batch()
    stock = loss_and_grads(model, input_ids=ids, labels=labels)
    patch_causal_lm_loss(model)
    fused = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fused[0].logits is None
    assert_same(stock, fused, rtol=1e-4, atol=1e-6)


def test_rejects_what_it_cannot_fuse():
    model = tiny_llama()
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        patch_causal_lm_loss(model)
    model = tiny_llama()
    model.loss_function = lambda *a, **k: None
    with pytest.raises(ValueError, match="custom loss_function"):
        patch_causal_lm_loss(model)
