"""fastft with TRL 1.16: fastft.integrations.trl.patch() computes TRL's log-probs with fastft's ops (same
values as TRL's own kernels), and SFT / GRPO training of a fastft-patched tiny model gives stock TRL's loss."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402

import fastft  # noqa: E402
import fastft.integrations.trl as fastft_trl  # noqa: E402
from patch_models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def trl_patch():
    handle = fastft_trl.patch()
    yield handle
    handle.undo()


@pytest.mark.parametrize("with_bias,temperature,softcap,scale",
                         list(itertools.product([False, True], [1.0, 0.7], [None, 3.0], [1.0, 0.5])))
def test_chunked_log_probs_match_trl(with_bias, temperature, softcap, scale):
    trl_head = trl_utils._ChunkedLogProbFunction
    fastft_head = fastft_trl._FastftChunkedLogProb(trl_head, Counter())
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = (torch.randn(37, 16) * 0.5).requires_grad_()
    bias = (torch.randn(37) * 0.1).requires_grad_() if with_bias else None
    targets = torch.randint(0, 37, (10,))
    results = []
    for head in (trl_head, fastft_head):
        logp = head.apply(hidden, weight, bias, targets, temperature, 16, softcap, scale, ("log_probs",))[0]
        grads = torch.autograd.grad((logp * torch.linspace(-1, 1, 10)).sum(), [hidden, weight])
        results.append((logp, *grads))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert fastft_head.counts == Counter({"fastft: log-probs from fastft.ops.linear_cross_entropy": 1})


@pytest.mark.parametrize("with_bias,temperature,softcap,scale",
                         [(False, 1.0, None, 1.0), (True, 0.7, 3.0, 0.5)])
def test_log_probs_with_entropy_and_top1_match_trl(with_bias, temperature, softcap, scale):
    """The calls of SFTTrainer (and GRPO's policy): log-probs, entropy and top-1 flags equal to TRL's, from
    fastft.ops.linear_selective_log_softmax (entropy differentiable, as TRL's, through the softcap too); a tied
    maximum counts as top-1 only at its first index, as TRL."""
    trl_head = trl_utils._ChunkedLogProbFunction
    counts = Counter()
    fastft_head = fastft_trl._FastftChunkedLogProb(trl_head, counts)
    # quarter-integers: every logit is exact, so tokens 3 and 5 (equal rows) tie exactly on every row, and
    # they are the maximum of the first four rows
    hidden = torch.randint(-3, 4, (12, 16)).float() * 0.25
    weight = torch.randint(-3, 4, (37, 16)).float() * 0.25
    weight[5] = weight[3]
    hidden[:4] = weight[3] * 2
    hidden.requires_grad_(), weight.requires_grad_()
    bias = None
    if with_bias:
        bias = torch.randint(-3, 4, (37,)).float() * 0.25
        bias[5] = bias[3] = bias.max()
        bias.requires_grad_()
    targets = torch.randint(0, 37, (12,))
    targets[:4] = torch.tensor([3, 5, 3, 5])
    outputs = ("log_probs", "entropy", "is_top1")
    want = trl_head.apply(hidden, weight, bias, targets, temperature, 16, softcap, scale, outputs)
    got = fastft_head.apply(hidden, weight, bias, targets, temperature, 16, softcap, scale, outputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=2e-6)
    assert got[2] is None and got[3] is None and torch.equal(got[4], want[4])
    assert got[4][:4].tolist() == [True, False, True, False]
    grads = [torch.autograd.grad(out[0].sum(), [hidden, weight], retain_graph=True) for out in (got, want)]
    for g, w in zip(*grads):  # fp32 rounding of logits up to ~20 (the peaked first rows)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert counts == Counter({"fastft: log-probs + entropy/is_top1 from fastft.ops.linear_selective_log_softmax": 1})
    weights = torch.linspace(-1, 1, 12)  # an entropy bonus plus a policy term: both gradients reach the head
    grads = [torch.autograd.grad((out[0] * weights + 0.3 * out[1]).sum(), [hidden, weight]) for out in (got, want)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_softcapped_gemma2_policy_pass_entropy_trains_like_stock():
    """TRL's fused head on a tiny Gemma-2 (final_logit_softcapping = 5) asking for log-probs and entropy, as
    GRPO's policy pass with an entropy bonus: patched, the call runs fastft.ops.linear_selective_log_softmax, the
    entropy has a grad_fn (it had none on the old softcap route), and log-probs, entropy and the gradients of a
    policy term plus an entropy bonus on the head and the backbone equal stock TRL's."""
    from patch_models import tiny_model

    outputs = ("log_probs", "entropy")
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt: not scored

    def run(patched):
        model = tiny_model("gemma2")
        assert model.config.final_logit_softcapping == 5.0
        trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=outputs)
        handle = fastft_trl.patch() if patched else None
        try:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            loss = -(out.log_probs * out.label_mask).sum() - 0.1 * (out.entropy * out.label_mask).sum()
            params = [model.get_output_embeddings().weight, model.model.layers[-1].mlp.down_proj.weight]
            grads = torch.autograd.grad(loss, params)
        finally:
            if handle is not None:
                handle.undo()
        return out, grads, handle

    (want, want_grads, _), (got, got_grads, handle) = run(False), run(True)
    assert handle.counts == Counter({"fastft: log-probs + entropy from fastft.ops.linear_selective_log_softmax": 1})
    assert got.entropy.grad_fn is not None
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metrics", [True, False])
def test_other_outputs_stay_trl_and_are_counted(metrics):
    handle = fastft_trl.patch(metrics=metrics)
    try:
        hidden, weight, targets = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
        head = trl_utils._ChunkedLogProbFunction
        assert isinstance(head, fastft_trl._FastftChunkedLogProb)
        outputs = ("log_probs", "mean_logits") if metrics else ("log_probs", "entropy")
        got = head.apply(hidden, weight, None, targets, 1.0, 8, None, 1.0, outputs)
        want = head.original.apply(hidden, weight, None, targets, 1.0, 8, None, 1.0, outputs)
        assert all(g is w is None or torch.equal(g, w) for g, w in zip(got, want))
        assert ("mean_logits requested" if metrics else "entropy requested (metrics=False)") in handle.report()
        with pytest.raises(ValueError, match="patched already with metrics"):
            fastft_trl.patch(metrics=not metrics)
    finally:
        handle.undo()


def test_selective_log_softmax_routed_and_undone():
    original = trl_utils.selective_log_softmax
    handle = fastft_trl.patch()
    assert fastft_trl.patch() is handle  # idempotent while live
    try:
        routed = trl_utils.selective_log_softmax
        assert routed is not original
        logits, index = torch.randn(3, 5, 19, dtype=torch.float64), torch.randint(0, 19, (3, 5))
        row_mask = torch.rand(3, 5) > 0.3
        for kwargs in ({}, {"temperature": 0.8}, {"row_mask": row_mask}):
            torch.testing.assert_close(routed(logits, index, **kwargs), original(logits, index, **kwargs))
        top_k = torch.randint(0, 19, (3, 5, 2))
        torch.testing.assert_close(routed(logits, top_k), original(logits, top_k))
        assert handle.counts["fastft: fastft.ops.selective_log_softmax"] == 3
        assert handle.counts["TRL: selective_log_softmax with top-K indices"] == 1
        with pytest.raises(ValueError, match="temperature"):
            routed(logits, index, temperature=0.0)
    finally:
        handle.undo()
    assert trl_utils.selective_log_softmax is original
    assert not isinstance(trl_utils._ChunkedLogProbFunction, fastft_trl._FastftChunkedLogProb)


# ------------------------------------------------------------------------------------------------
# Trainers on a tiny config-built model with a word-level letter tokenizer (no downloads)
# ------------------------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(LETTERS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def model_dir(tmp_path):
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    _tokenizer().save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def _common_args(tmp_path):
    return dict(output_dir=str(tmp_path / "out"), logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                learning_rate=1e-3, disable_tqdm=True, seed=0, adam_epsilon=1e-6)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_trainer_with_patched_peft_model_matches_stock(model_dir, tmp_path):
    data = datasets.Dataset.from_dict({"text": [" ".join(LETTERS[i:i + 6]) for i in range(12)]})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")

    def run(patched):
        args = trl.SFTConfig(max_steps=3, per_device_train_batch_size=4, **_common_args(tmp_path))
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                                 peft_config=lora)
        handles = (fastft.patch(trainer.model), fastft_trl.patch()) if patched else ()
        try:
            trainer.train()
        finally:
            for handle in handles:
                handle.undo()
        return _losses(trainer), handles

    stock, _ = run(False)
    fused, (handle, _) = run(True)
    assert len(handle.report.fused("lora")) == 14 and handle.report.fused("layers")
    assert len(stock) == 3 and stock[-1] < stock[0]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(stock), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_grpo_two_steps_patched_matches_stock(model_dir, tmp_path):
    # The task: continue three letters; the rule reward is 1 for the exact next letter, less the further off.
    data = datasets.Dataset.from_dict({"prompt": [" ".join(LETTERS[i:i + 3]) for i in range(8)],
                                       "answer": [LETTERS[i + 3] for i in range(8)]})

    def reward(completions, answer, **kwargs):
        firsts = [(c.split() or ["?"])[0][0] for c in completions]
        return [1.0 - abs(ord(f) - ord(a)) / 26 for f, a in zip(firsts, answer)]

    def run(patched):
        args = trl.GRPOConfig(max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                              beta=0.1, **_common_args(tmp_path))
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        handles = (fastft.patch(model), fastft_trl.patch()) if patched else ()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=_tokenizer())
        try:
            trainer.train()
        finally:
            if patched:
                handles[1].undo()
                # TRL and accelerate wrapped model.forward after the patch: undo says it drops their wrappers
                with pytest.warns(UserWarning, match="wrapped after fastft.patch"):
                    handles[0].undo()
        history = [e for e in trainer.state.log_history if "loss" in e]
        return history, handles

    stock, _ = run(False)
    fused, (_, trl_handle) = run(True)
    # the reference model's log-probs (the KL term) and the policy's (with the entropy it logs) ran on fastft
    assert trl_handle.counts["fastft: log-probs from fastft.ops.linear_cross_entropy"] == 2
    assert trl_handle.counts["fastft: log-probs + entropy from fastft.ops.linear_selective_log_softmax"] > 0
    assert not [k for k in trl_handle.counts if k.startswith("TRL:")]
    assert len(stock) == len(fused) == 2 and any(e["reward_std"] > 0 for e in stock)
    for s, f in zip(stock, fused):
        assert s["reward"] == f["reward"]  # the same completions were sampled
        torch.testing.assert_close(torch.tensor(f["loss"]), torch.tensor(s["loss"]), rtol=1e-3, atol=1e-6)
