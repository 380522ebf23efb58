"""One DPO step (policy forward + frozen reference forward + loss + backward) at SmolLM2-135M's shapes:
fastft's recipe step (``fastft.recipes.dpo.dpo_terms``: summed completion log-probs from the decoder's hidden
states through ``fastft.rl.token_logprobs``, then ``fastft.rl.dpo_loss``) against TRL's ``DPOTrainer``
(its ``compute_loss``: TRL's own fused, tiled LM head, ``fused_lm_head=True``) and against the stock
computation (the recipe with ``kernels.loss`` off: full [2B, T, V] logits, log_softmax + gather). Same batch
(TRL's collator layout), same weights (copies of one model), one process, interleaved rounds.

The model is config-built with SmolLM2-135M's shapes (vocabulary 49152, hidden 576, intermediate 1536, 9 heads,
3 KV heads, tied embeddings) but ``--layers`` decoder layers (default 4, not 30: a CPU step of the full depth
takes minutes); every layer adds the same activations to all three providers, so the head's share of the
peak shrinks as the depth grows. The policy's decoder layers train and its tied embedding / head is frozen
(as under LoRA, whose "all-linear" leaves the head out; a trained head's [V, H] gradient would dominate every
provider's peak alike); no LoRA, so the three steps differ in the loss head only. Peak memory: bytes of the tensors the step creates (``LiveBytes``, a dispatch-mode
counter; weights that exist before it are not counted), gradients included.

    python -m benchmarks.bench_dpo [--pairs 4] [--prompt 96] [--completion 160] [--layers 4] [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from benchmarks.gpu_static.memory_plan import LiveBytes
from benchmarks.harness import emit_text_report, interleave, loss_time_memory_table
from fastft.recipes.dpo import DPOOptions, dpo_terms
from fastft.runtime.config import Config, replace

VOCAB = 49152


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def preference_samples(pairs: int, prompt: int, completion: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    # completions of unequal length, as real pairs are: padding and the completion mask both matter
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(completion), "rejected_ids": ids(completion - 8 * (i % 3))}
            for i in range(pairs)]


def trl_dpo_trainer(model, ref_model, beta: float, out: str):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl import DPOConfig, DPOTrainer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1, "</s>": 2}, "a")),
                                  pad_token="<pad>", eos_token="</s>")
    args = DPOConfig(output_dir=out, beta=beta, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                     max_length=None, logging_strategy="no", save_strategy="no", bf16=False, fp16=False)
    data = Dataset.from_list([{"prompt": "a", "chosen": "a", "rejected": "a a"}])  # TRL needs one; the batch is ours
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=96)
    parser.add_argument("--completion", type=int, default=160)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    base = smollm2_shaped(args.layers)
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    base.get_input_embeddings().requires_grad_(False)  # the tied head frozen, as under LoRA ("all-linear" skips it)
    with torch.no_grad():  # a policy a little away from the reference: the log-ratios are not all 0
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours_policy, stock_policy = copy.deepcopy(base), copy.deepcopy(base)
    trl = trl_dpo_trainer(base, copy.deepcopy(reference), args.beta, tempfile.mkdtemp())
    batch = DataCollatorForPreference(pad_token_id=0)(preference_samples(args.pairs, args.prompt, args.completion))
    options = DPOOptions(beta=args.beta)
    cfg_on, cfg_off = (replace(Config(), data={"generator": "addition_preferences"}, kernels={"loss": on}) for on in (True, False))

    providers = {
        "stock (full logits, log_softmax + gather)": (stock_policy, lambda: dpo_terms(cfg_off, options, stock_policy, reference, batch)[0]),
        "TRL DPOTrainer.compute_loss (fused_lm_head)": (trl.model, lambda: trl.compute_loss(trl.model, dict(batch))),
        "fastft dpo recipe (rl.token_logprobs)": (ours_policy, lambda: dpo_terms(cfg_on, options, ours_policy, reference, batch)[0]),
    }

    def step(name):
        model, loss_fn = providers[name]
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    losses = {name: step(name) for name in providers}  # also the warm-up
    # interleaved: load drift hits every provider alike
    times = interleave({name: (lambda r, name=name: step(name)) for name in providers}, args.rounds,
                       warmup_rounds=0, alternate=True)
    peaks = {}
    for name in providers:
        providers[name][0].zero_grad(set_to_none=True)
        with LiveBytes() as tracker:
            step(name)
        peaks[name] = tracker.peak
    tokens = int(batch["attention_mask"].sum())
    stock, trl_name, ours = providers
    lines = [f"One DPO step (policy fwd+bwd, reference fwd, sigmoid loss, beta {args.beta}): config-built Llama with "
             f"SmolLM2-135M's shapes but {args.layers} layers (not 30), vocabulary {VOCAB}, {args.pairs} pairs "
             f"(batch {2 * args.pairs} rows x {batch['input_ids'].shape[1]} tokens, {tokens} real, "
             f"{int(batch['completion_mask'].sum())} completion tokens), fp32, decoder layers trained (head frozen), CPU "
             f"({torch.get_num_threads()} threads), {args.rounds} interleaved rounds",
             "", *loss_time_memory_table(losses, times, peaks, trl_name)]
    lines += ["", f"|fastft - TRL| loss = {abs(losses[ours] - losses[trl_name]).item():.2e}; "
                  f"|fastft - stock| = {abs(losses[ours] - losses[stock]).item():.2e}; "
                  f"fastft peak / stock peak = {peaks[ours] / peaks[stock]:.2f}"]
    return emit_text_report(lines, args.out)


if __name__ == "__main__":
    main()
