"""One-process trainer checks on a tiny config-built Llama: exact loss normalization under gradient
accumulation (and the naive mean of means as a negative control), activation checkpointing modes,
bit-exact DCP resume with dropout (and without RNG restore as a negative control), a save killed
midway, clear errors that leave a checkpoint untouched, packing, and the parameter-efficient methods
(prefix tuning and bottleneck adapters, each against its kernels-off twin)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import METHODS, tiny_config, trainable_state, write_uneven_data
from fastft.runtime import checkpoint as ckpt_module
from fastft.runtime.checkpoint import latest_checkpoint
from fastft.runtime.config import ConfigError
from fastft.runtime.data import DataError, IGNORE_INDEX
from fastft.runtime.models import ModelLoadError
from fastft.runtime.tasks import CausalLMTask
from fastft.runtime.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_uneven_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def first_step_grads(trainer) -> dict:
    """Gradients of step 0 as the optimizer would see them."""
    grads = {}

    def capture(optimizer, args, kwargs):  # a step pre-hook: the gradients the step is about to apply
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
    hook = trainer.optimizer.register_step_pre_hook(capture)
    try:
        trainer.train_step(0)
    finally:
        hook.remove()  # later steps of the same trainer need no copies
    return grads


class MeanOfMeans(CausalLMTask):
    """HF Trainer's pre-2024-fix accumulation: each micro-batch's mean loss, averaged over micro-batches."""

    def loss(self, model, batch, normalizer):
        return model(**batch, use_cache=False).loss / self.cfg.batch.grad_accum


def test_grad_accumulation_is_exact(data, tmp_path):
    full = first_step_grads(Trainer(tiny_config(tmp_path / "a", data, batch={"micro_batch_size": 4})))
    accum = first_step_grads(Trainer(tiny_config(tmp_path / "b", data, batch={"micro_batch_size": 2, "grad_accum": 2})))
    assert full.keys() == accum.keys() and full
    for name in full:
        torch.testing.assert_close(accum[name], full[name], atol=1e-6, rtol=0, msg=name)
    # negative control: the same micro-batches averaged as means of means
    cfg = tiny_config(tmp_path / "c", data, batch={"micro_batch_size": 2, "grad_accum": 2})
    trainer = Trainer(cfg, task=None)
    trainer.task.__class__ = MeanOfMeans
    naive = first_step_grads(trainer)
    worst = max(float((naive[n] - full[n]).abs().max()) for n in full)
    assert worst > 1e-4, worst


@pytest.mark.parametrize("mode", ["full", "every_k", "offload"])
def test_activation_checkpointing_matches_none(data, tmp_path, mode):
    plain = Trainer(tiny_config(tmp_path / "none", data))
    plain.fit()
    checkpointed = Trainer(tiny_config(tmp_path / mode, data, memory={"activation_checkpointing": mode, "every_k": 2}))
    assert checkpointed.ac_blocks == (1 if mode == "every_k" else 2)
    checkpointed.fit()
    a, b = trainable_state(plain), trainable_state(checkpointed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-6, msg=name)


def dropout_config(out, data, steps):
    return tiny_config(out, data, run={"max_steps": steps}, model={"dropout": 0.2}, lora={"lora_dropout": 0.3},
                       checkpoint={"at_end": True})


def test_resume_is_bit_exact_and_needs_rng(data, tmp_path):
    straight = Trainer(dropout_config(tmp_path / "straight", data, 4))
    straight.fit()
    first = Trainer(dropout_config(tmp_path / "resumed", data, 2))
    first.fit()
    torch.manual_seed(1234)  # a resumed process starts from another RNG state
    second = Trainer(dropout_config(tmp_path / "resumed", data, 4))
    second.fit()
    assert second.step == 4 and len(second.history) == 2
    want = trainable_state(straight)
    got = trainable_state(second)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert [r["loss"] for r in second.history] == [r["loss"] for r in straight.history[2:]]
    # negative control: the same resume without restoring the RNG states
    torch.manual_seed(1234)
    no_rng = Trainer(dropout_config(tmp_path / "resumed", data, 4))
    assert no_rng.resume(restore_rng=False)
    for step in range(2, 4):
        no_rng.train_step(step)
    got = trainable_state(no_rng)
    assert not all(torch.equal(got[n], want[n]) for n in want)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_save_leaves_latest(data, tmp_path, monkeypatch):
    trainer = Trainer(dropout_config(tmp_path / "run", data, 2))
    trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    good = latest_checkpoint(root)
    before = _snapshot(root)

    def dies_midway(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(ckpt_module.dcp, "save", dies_midway)
    trainer.step = 3
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert latest_checkpoint(root) == good
    assert {k: v for k, v in _snapshot(root).items() if ".tmp" not in k} == before
    monkeypatch.undo()
    resumed = Trainer(dropout_config(tmp_path / "run", data, 2))
    assert resumed.resume() and resumed.step == 2


def test_errors_name_the_problem_and_keep_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    Trainer(dropout_config(out, data, 1)).fit()
    before = _snapshot(out)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(data.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        Trainer(dropout_config(out, bad_line, 2))
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:1: .*'messages' or 'instruction' \+ 'output'"):
        Trainer(dropout_config(out, missing_field, 2))
    gguf = tiny_config(out, data, model={"builder": "hf", "path": str(tmp_path), "gguf_file": "nope.gguf"})
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        Trainer(gguf)
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr; valid keys of \[optim\]: lr, "):
        tiny_config(out, data, optim={"lrr": 1.0})
    assert _snapshot(out) == before


def test_packing_keeps_examples_apart(data, tmp_path):
    """The loss of a packed row equals the summed losses of its examples run alone (block-causal
    attention from the restarted position ids, no prediction across a boundary)."""
    trainer = Trainer(tiny_config(tmp_path / "p", data, data={"packing": True, "max_length": 160},
                                  kernels={"loss": False}))
    with torch.no_grad():  # weights large enough that attending to another example changes the loss
        for p in trainer.model.parameters():
            p.mul_(8.0)
    task, model = trainer.task, trainer.model
    model.eval()
    pack = next(s for s in task.train_samples if s["position_ids"].count(0) >= 2)
    short = min(task.train_samples, key=lambda s: len(s["input_ids"]))  # padded when batched with `pack`
    assert len(short["input_ids"]) < len(pack["input_ids"])

    def examples(sample):
        starts = [i for i, p in enumerate(sample["position_ids"]) if p == 0] + [len(sample["input_ids"])]
        return [{"input_ids": sample["input_ids"][a:b], "labels": [IGNORE_INDEX] + sample["labels"][a + 1:b]}
                for a, b in zip(starts, starts[1:])]
    one = torch.ones(())
    with torch.no_grad():
        packed = task.loss(model, task.collate([pack, short]), one)
        alone = sum(task.loss(model, task.collate([e]), one) for e in examples(pack) + examples(short))
        # negative control: the same row as one sequence lets examples attend to each other
        leaky = task.loss(model, task.collate([{"input_ids": pack["input_ids"], "labels": pack["labels"]}]), one)
        pack_alone = sum(task.loss(model, task.collate([e]), one) for e in examples(pack))
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    assert abs(float(leaky - pack_alone)) > 1e-2


def test_exported_adapter_loads_in_peft(data, tmp_path):
    """The adapter the run exports is PEFT's format: PeftModel.from_pretrained gives the trained model."""
    import peft

    from fastft.runtime.models import build_model

    cfg = tiny_config(tmp_path / "run", data, run={"max_steps": 2, "export_methods": True},
                      kernels={"loss": False, "norms": False, "mlp": False})
    trainer = Trainer(cfg)
    trainer.fit()
    base, _ = build_model(cfg)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "lora")).eval()
    trainer.model.eval()
    batch = trainer.task.collate(trainer.task.train_samples[:2])
    with torch.no_grad():
        want = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    untrained, _ = build_model(cfg)
    with torch.no_grad():
        stock = untrained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (stock - want).abs().max() > 1e-3  # the adapter changes the model


@pytest.mark.parametrize("method, switch", [("bottleneck", "bottleneck"), ("prefix", "prefix")])
def test_method_matches_its_kernels_off_twin(data, tmp_path, method, switch):
    """Bottleneck adapters through fastft's fused op vs the same block in eager torch; fastft's prefix vs
    PEFT's prefix tuning: the same initial parameters, losses and trained parameters."""
    runs = {}
    for on in (True, False):
        cfg = tiny_config(tmp_path / f"{method}_{on}", data, lora={"enabled": False}, kernels={switch: on},
                          **{method: METHODS[method]})
        trainer = Trainer(cfg)
        trainer.fit()
        params = {n.split("base_model.model.")[-1].replace("prompt_encoder.default", "fastft_prefix_encoder"): p
                  for n, p in trainable_state(trainer).items()}
        runs[on] = ([r["loss"] for r in trainer.history], params)
    (fast_losses, fast), (eager_losses, eager) = runs[True], runs[False]
    assert fast.keys() == eager.keys() and fast
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-6)
    for name in fast:
        torch.testing.assert_close(fast[name], eager[name], atol=1e-5, rtol=1e-5, msg=name)
    assert fast_losses[-1] < fast_losses[0]


def test_methods_together_train_their_parameters_and_export(data, tmp_path):
    """LoRA + prefix + bottleneck adapters: only the added parameters train, every one of them gets a
    gradient, and each method is exported in its own folder, loadable again."""
    import peft

    from fastft.tuners import bottleneck
    from fastft.runtime.models import build_model

    cfg = tiny_config(tmp_path / "run", data, **METHODS)
    trainer = Trainer(cfg)
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    kinds = {next(k for k in ("lora_", "fastft_prefix_encoder", "fastft_adapter", "") if k in n) for n in names}
    assert kinds == {"lora_", "fastft_prefix_encoder", "fastft_adapter"}
    grads = first_step_grads(trainer)
    # (lora_A gets none at step 0: lora_B starts at zero)
    assert set(grads) == names and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" not in n)
    summary = trainer.fit()
    out = tmp_path / "run"
    assert sorted(Path(p).name for p in summary["exported"]) == ["bottleneck", "lora", "prefix"]
    model, _ = build_model(cfg)
    bottleneck.load(model, str(out / "bottleneck"))
    trained = {n: p for n, p in trainer.model.named_parameters() if "fastft_adapter" in n}
    for name, value in model.named_parameters():
        if "fastft_adapter" in name:
            assert torch.equal(value, trained.pop(name)), name
    assert not trained
    model = peft.PeftModel.from_pretrained(model, str(out / "prefix"))
    with torch.no_grad():
        want = trainer.model.get_submodule("fastft_prefix_encoder")()
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, want)
    lora = load_file(out / "lora" / "adapter_model.safetensors")
    assert lora and all("lora_A" in k or "lora_B" in k for k in lora)


def test_resume_restores_early_stopping_state(data, tmp_path):
    """The best eval metric and the count of evals without improvement come back with the step."""
    cfg = tiny_config(tmp_path / "run", data, run={"max_steps": 4}, checkpoint={"every": 2},
                      eval={"every": 1, "early_stopping_patience": 10, "metric": "loss"}, data={"eval_path": str(data)})
    first = Trainer(cfg)
    first.fit()
    losses = [e["loss"] for e in first.eval_history if e["step"] <= 2]
    bad = sum(1 for i, v in enumerate(losses) if i > 0 and v >= min(losses[:i]))
    second = Trainer(cfg)
    assert second.resume() and second.step == 2
    assert second.best == min(losses) and second.bad_evals == bad


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_meter_counts_the_steps_not_what_came_before_or_evals():
    """A large buffer freed before training starts, and one held only during an eval, do not count in
    the steps' peak; one held during a step does. Run in a fresh interpreter: after ~1,600 tests the
    suite's own process can sit at a container's memory limit, where touching 150 MiB makes the kernel
    drop as many file-backed pages (torch's mapped libraries) and the RSS peak does not move (seen once in
    CI: peak == resident). The child reports RssFile too, and pages dropped are added back."""
    import json
    import subprocess
    import sys

    script = r'''
import gc, json, torch
from fastft.runtime.memory import MemoryMeter, process_status_mb

def touch(mb):  # resident pages, not just reserved address space
    t = torch.empty(mb << 18)
    t.fill_(1.0)
    return t

model = torch.nn.Linear(8, 8)
before = touch(400)
del before
gc.collect()
meter = MemoryMeter(torch.device("cpu"))
meter.start(model)
out = {"resident": meter.resident_mb, "after_start": meter.peak(), "file0": process_status_mb("RssFile")}
held = touch(150)
out["step_peak"] = meter.peak()
out["file1"] = process_status_mb("RssFile")
del held
gc.collect()
meter.pause()
during_eval = touch(600)
del during_eval
gc.collect()
meter.resume()
out["after_eval"] = meter.peak()
print(json.dumps(out))
'''
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    reclaimed = m["file0"] - m["file1"]
    assert m["after_start"] < m["resident"] + 200, m  # the freed 400 MiB before the start is not counted
    # the 150 MiB held in a step is counted, less any mapped-file pages the kernel dropped to make room
    assert m["step_peak"] + max(reclaimed, 0) >= m["resident"] + 140, m
    assert m["after_eval"] < m["step_peak"] + 100, m  # the eval's 600 MiB is not counted


def test_compiled_blocks_match_eager(data, tmp_path):
    """compile.enabled: every decoder block torch.compile'd, with full activation checkpointing traced
    inside, gives the eager run's losses and trained parameters."""
    runs = {}
    for compiled in (False, True):
        trainer = Trainer(tiny_config(tmp_path / str(compiled), data, compile={"enabled": compiled},
                                      memory={"activation_checkpointing": "full" if compiled else "none"}))
        summary = trainer.fit()
        runs[compiled] = ([r["loss"] for r in trainer.history], trainable_state(trainer))
        assert summary["compiled_blocks"] == (2 if compiled else 0)
    (eager_losses, eager), (compiled_losses, compiled) = runs[False], runs[True]
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-5)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rerun_without_resume_keeps_every_checkpoint(data, tmp_path):
    """Issue 21, reproduction 2: a run without resume in a folder of checkpoints pruned the step it had
    just written (steps sorted by name), leaving `latest` naming a missing folder for the next run."""
    out = tmp_path / "p"
    Trainer(tiny_config(out, data, run={"max_steps": 4}, checkpoint={"every": 2, "at_end": True})).fit()
    root = out / "checkpoints"
    before = _snapshot(root)
    with pytest.raises(ConfigError, match=r"--run\.output_dir.*--run\.overwrite=true"):
        Trainer(tiny_config(out, data, run={"max_steps": 1, "resume": False}, checkpoint={"at_end": True}))
    assert _snapshot(root) == before
    again = Trainer(tiny_config(out, data, run={"max_steps": 2}, checkpoint={"at_end": True}))
    again.fit()
    assert again.step == 4 and _snapshot(root) == before  # nothing left to train, nothing rewritten
    # started over on request: the new step 1 is kept, `latest` names it, and the next run resumes it
    Trainer(tiny_config(out, data, run={"max_steps": 1, "resume": False, "overwrite": True},
                        checkpoint={"at_end": True})).fit()
    assert [p.name for p in ckpt_module.step_folders(root)] == ["step_00000001"]
    assert (root / "latest").read_text() == "step_00000001"
    third = Trainer(tiny_config(out, data, run={"max_steps": 2}, checkpoint={"at_end": True}))
    assert third.resume() and third.step == 1


def test_pruning_orders_steps_numerically_and_keeps_the_newest(data, tmp_path):
    """Pruning follows the step numbers, then the run (a second save of step 10 is newer than the first
    and supersedes it), and keeps the newest steps; `latest` names the last one."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, data, run={"max_steps": 1}, checkpoint={"keep": 2}))
    for step in (9, 10, 10, 11):
        trainer.step = step
        trainer.checkpointer.current_step = None  # a save of each, as separate runs would
        trainer.save()
    names = [p.name for p in ckpt_module.step_folders(out / "checkpoints")]
    assert names == ["step_00000010-1", "step_00000011"], names
    assert latest_checkpoint(out / "checkpoints").name == "step_00000011"


def test_resume_after_a_config_change_is_one_line(data, tmp_path, capsys):
    """Issue 21, reproduction 3: `--lora.r=8` after an r=4 run was a raw DCP size-mismatch traceback,
    and nothing said that a run resumed."""
    out = tmp_path / "run"
    Trainer(tiny_config(out, data, run={"max_steps": 2}, checkpoint={"at_end": True})).fit()
    before = _snapshot(out / "checkpoints")
    with pytest.raises(ckpt_module.CheckpointMismatch) as caught:
        Trainer(tiny_config(out, data, run={"max_steps": 3}, lora={"r": 8})).fit()
    message = str(caught.value)
    assert "lora.r = 4 in the checkpoint, 8 now" in message and "\n" not in message
    assert "--run.output_dir" in message and "--run.overwrite=true" in message
    assert _snapshot(out / "checkpoints") == before
    capsys.readouterr()
    Trainer(tiny_config(out, data, run={"max_steps": 3})).fit()
    assert f"resumed from step 2 of {out / 'checkpoints' / 'step_00000002'}" in capsys.readouterr().out


def test_checkpoint_holds_no_frozen_weights_tied_head_included(data, tmp_path):
    """Issue 21, item 4: a head tied to the frozen embeddings was saved (DCP's ignore_frozen_params sees
    the embedding's name only): the checkpoint holds exactly the trainable parameters."""
    import torch.distributed.checkpoint as dcp

    trainer = Trainer(tiny_config(tmp_path / "run", data, run={"max_steps": 1}, model={"tie_embeddings": True},
                                  checkpoint={"at_end": True}))
    trainer.fit()
    step = latest_checkpoint(tmp_path / "run" / "checkpoints")
    keys = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert {k[len("model."):] for k in keys if k.startswith("model.")} == set(trainable_state(trainer))
    assert not any("lm_head" in k or "embed_tokens" in k for k in keys)
