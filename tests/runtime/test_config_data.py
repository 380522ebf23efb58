"""Config loading and overrides, the CLI, and the data pipeline (response-only labels, order, sharding)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_uneven_data
from fastft.runtime import cli
from fastft.runtime.config import ConfigError, load_config
from fastft.runtime.data import (IGNORE_INDEX, DataError, global_indices, pack, read_jsonl, step_micro_batches,
                                 tokenize)
from fastft.runtime.models import byte_tokenizer

ROOT = Path(__file__).absolute().parents[2]


def test_toml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nlr = 1e-3\nschedule = "wsd"\n[data]\ngenerator = "addition"\n')
    cfg = load_config(path, ["--optim.lr=3e-4", "--parallel.mode=fsdp2", "--lora.target_modules=[\"q_proj\"]",
                             "--run.output_dir=out/x"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.schedule == "wsd" and cfg.parallel.mode == "fsdp2"
    assert cfg.lora.target_modules == ["q_proj"] and cfg.run.output_dir == "out/x"
    assert cfg.optim.warmup_steps == 0  # untouched default
    recipe = load_config(path, ["--recipe.module=my.recipe", "--recipe.options.group_size=4"])
    assert recipe.recipe.module == "my.recipe" and recipe.recipe.options == {"group_size": 4}
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # frozen


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", r"unknown config key optim\.lrr; valid keys of \[optim\]: lr, weight_decay"),
    ("--optimizer.lr=1", r"unknown config section 'optimizer'; valid sections: run, model"),
    ("--optim.lr=fast", r"optim\.lr must be a float, got 'fast'"),
    ("--batch.grad_accum=0", r"batch\.grad_accum must be positive"),
    ("--parallel.mode=fsdp3", r"parallel\.mode = 'fsdp3' is not one of ddp, zero1, zero2, fsdp2, hsdp"),
    ("--precision.impl=fsdp", r"precision\.impl = 'fsdp' needs parallel\.mode zero2, fsdp2 or hsdp"),
    ("optim.lr=1", r"must look like --section\.key=value"),
    ("--bottleneck.placement=middle", r"bottleneck\.placement = 'middle' is not one of houlsby, pfeiffer"),
    ("--bottleneck.dropout=1.0", r"bottleneck\.dropout must be in \[0, 1\)"),
    ("--prefix.num_virtual_tokens=0", r"prefix\.num_virtual_tokens must be positive"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--data.generator=addition", override])


@pytest.mark.parametrize("overrides, message", [
    (["--prefix.enabled=true", "--kernels.enabled=false"], r"PEFT applies one method per model"),
    (["--prefix.enabled=true", "--kernels.lora=false", "--kernels.prefix=false"], r"PEFT applies one method"),
    (["--prefix.enabled=true", "--data.packing=true"], r"prefix\.enabled with data\.packing"),
])
def test_bad_method_combinations_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--data.generator=addition", *overrides])
    load_config(None, ["--data.generator=addition", "--prefix.enabled=true", "--kernels.lora=false"])  # one PEFT method


def test_cli_reports_config_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml' does not exist" in capsys.readouterr().err
    assert cli.main(["--data.generator=addition", "--run.nonsense=1"]) == 2
    assert "unknown config key run.nonsense" in capsys.readouterr().err


def test_setting_of_an_excluded_key_is_an_error_not_ignored(tmp_path, capsys):
    """Issue 21, reproduction 1: the recipe sets data.generator, the command line data.path: the path
    was silently ignored (the run trained on generated data and exited 0)."""
    recipe = str(ROOT / "recipes" / "instruction_tuning.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(recipe, ["--data.path=missing.jsonl", "--run.max_steps=2"])
    message = str(caught.value)
    assert "data.path = 'missing.jsonl' (command line)" in message and "instruction_tuning.toml)" in message
    assert "--data.generator=" in message and "\n" not in message
    assert cli.main([recipe, "--data.path=missing.jsonl", "--run.max_steps=2",
                     f"--run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exclude each other" in err and not (tmp_path / "run").exists()
    # an empty value unsets the recipe's key (both shell spellings)
    for clear in ("--data.generator=", '--data.generator=""'):
        cfg = load_config(recipe, ["--data.path=train.jsonl", clear])
        assert cfg.data.path == "train.jsonl" and cfg.data.generator == ""
    with pytest.raises(ConfigError, match=r"data\.eval_path = 'e\.jsonl' \(command line\) and data\.generator"):
        load_config(recipe, ["--data.eval_path=e.jsonl"])
    with pytest.raises(ConfigError, match=r"model\.path = 'x' \(command line\) is not used by model\.builder = 'tiny_llama'"):
        load_config(ROOT / "recipes" / "tiny_smoke.toml", ["--model.path=x"])


def test_model_and_targeting_failures_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Issue 21, item 5: a folder without a model exited 1 with a tokenizer traceback; a LoRA target
    matching nothing printed 27 lines of traceback. Both: exit 2, one line; --debug shows the traceback."""
    smoke = str(ROOT / "recipes" / "tiny_smoke.toml")
    (tmp_path / "empty").mkdir()
    cases = {"model folder": (["--model.builder=hf", f"--model.path={tmp_path / 'empty'}"], "has no config.json"),
             "target": (["--lora.target_modules=qproj"], "lora.target_modules = 'qproj': target_modules='qproj'")}
    for name, (args, expected) in cases.items():
        argv = [smoke, *args, f"--run.output_dir={tmp_path / name}", "--run.progress=false"]
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
        with pytest.raises(ValueError, match="config.json|qproj"):
            cli.main([*argv, "--debug"])
        monkeypatch.setenv(cli.DEBUG_ENV, "1")
        with pytest.raises(ValueError, match="config.json|qproj"):
            cli.main(argv)
        monkeypatch.delenv(cli.DEBUG_ENV)


def test_cli_nproc_relaunches_through_torchrun(tmp_path):
    """`python -m fastft train ... --nproc 2`: two gloo ranks, one summary from rank 0."""
    data = write_uneven_data(tmp_path / "d.jsonl", n=16)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastft", "train", "--nproc", "2", f"--data.path={data}", "--model.builder=tiny_llama",
           "--model.hidden_size=16", "--model.num_heads=2", "--model.intermediate_size=32", "--run.max_steps=2",
           f"--run.output_dir={tmp_path / 'out'}", "--run.progress=false", "--run.plots=false",
           "--batch.micro_batch_size=2", "--data.max_length=96", "--lora.r=2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert proc.stdout.count("steps 2:") == 1  # rank 0 prints
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").is_file()


def test_labels_only_on_responses():
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok!"}]
    ex = tokenize(tok, messages, 512, "x")
    labelled = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])
    assert labelled == "yo<|im_end|>\nok!<|im_end|>\n"
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(ex.input_ids, ex.labels))
    assert tok.decode(ex.prompt).endswith("again<|im_end|>\n<|im_start|>assistant\n")


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: no assistant message"):
        read_jsonl(str(path))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_packing_restarts_positions_and_hides_boundaries():
    tok = byte_tokenizer()
    exs = [tokenize(tok, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], 512, "x")
           for u, a in (("a", "bb"), ("ccc", "d"), ("e", "ffff"))]
    packs = pack(exs, max_length=2 * max(len(e.input_ids) for e in exs))
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(e.input_ids) for e in exs)
    first = packs[0]
    starts = [i for i, p in enumerate(first["position_ids"]) if p == 0]
    assert len(starts) >= 2 and all(first["labels"][s] == IGNORE_INDEX for s in starts)
    assert first["position_ids"][starts[1] - 1] == starts[1] - 1


def test_order_is_a_function_of_seed_and_step_and_ranks_partition_it():
    samples = list(range(10))
    assert global_indices(10, 3, 5, 4) == global_indices(10, 3, 5, 4)
    assert global_indices(10, 3, 5, 4) != global_indices(10, 4, 5, 4)
    epoch = [i for step in range(5) for i in global_indices(10, 0, step, 2)]
    assert sorted(epoch) == samples  # one epoch visits every sample once
    world = [x for rank in range(2) for mb in step_micro_batches(samples, 0, 7, 2, 3, rank, 2) for x in mb]
    single = [x for mb in step_micro_batches(samples, 0, 7, 2, 6, 0, 1) for x in mb]
    assert sorted(world) == sorted(single) and len(world) == 12


def test_schedules_warm_up_then_decay():
    from fastft.runtime.trainer import lr_lambda

    def curve(**optim):
        cfg = load_config(None, ["--data.generator=addition", "--run.max_steps=100",
                                 *[f"--optim.{k}={v}" for k, v in optim.items()]])
        return [lr_lambda(cfg)(step) for step in range(100)]
    cosine = curve(schedule='"cosine"', warmup_steps=10, min_lr_ratio=0.1)
    assert cosine[:10] == [pytest.approx((s + 1) / 10) for s in range(10)]
    assert cosine[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert cosine[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    wsd = curve(schedule='"wsd"', warmup_steps=5, decay_fraction=0.2)
    assert wsd[5:80] == [1.0] * 75  # stable until the last 20% of the steps
    assert wsd[90] == pytest.approx(0.5) and wsd[99] == pytest.approx(0.05)


def test_register_generator_adds_a_data_generator_and_refuses_a_second_under_its_name(tmp_path):
    from fastft.runtime.data import GENERATORS, load_records, register_generator

    @register_generator("test_constant_records")
    def constant(n, seed):
        return [{"instruction": f"say {i + seed % 7}", "output": str(i)} for i in range(n)]

    try:
        register_generator("test_constant_records")(constant)  # the same function again (a re-import): fine
        cfg = load_config(None, ["--data.generator=test_constant_records", "--data.num_train=3", "--data.num_eval=2"])
        train, held_out = load_records(cfg)
        assert len(train) == 3 and len(held_out) <= 2 and train[0]["instruction"].startswith("say")
        with pytest.raises(ValueError, match="'test_constant_records' is already registered"):
            register_generator("test_constant_records")(lambda n, seed: [])
        with pytest.raises(TypeError, match="non-empty string"):
            register_generator("")
    finally:
        GENERATORS.pop("test_constant_records", None)


def test_recipe_options_name_an_unknown_key_and_a_wrong_type():
    from dataclasses import dataclass

    from fastft.recipes.common import recipe_options

    @dataclass(frozen=True)
    class Options:
        group_size: int = 4
        beta: float = 0.1

    def options(**table):
        overrides = [f"--recipe.options.{k}={v}" for k, v in table.items()]
        return recipe_options(Options, load_config(None, ["--recipe.module=my.recipe", "--data.generator=addition",
                                                          *overrides]))

    assert options(beta=1) == Options(beta=1.0)  # an integer where a float is expected
    with pytest.raises(ConfigError, match=r"unknown config key recipe\.options\.beat for recipe 'my\.recipe'; "
                                          r"valid keys of \[recipe\.options\]: group_size, beta"):
        options(beat=0.2)
    with pytest.raises(ConfigError, match=r"recipe\.options\.group_size must be an integer, got 'x'"):
        options(group_size='"x"')

def test_method_sections_are_the_tuners_configs():
    """[lora] / [prefix] / [bottleneck] carry the tuners' own field names (PEFT's where PEFT has the
    method) and build those configs; the names of 0.1's development say where they went."""
    from fastft.tuners import BottleneckConfig, LoraConfig, PrefixTuningConfig

    cfg = load_config(None, ["--data.generator=addition", "--lora.lora_alpha=8", "--lora.lora_dropout=0.1",
                             "--prefix.prefix_projection=true", "--prefix.encoder_hidden_size=0"])
    for section, cls in (("lora", LoraConfig), ("prefix", PrefixTuningConfig), ("bottleneck", BottleneckConfig)):
        keys = {f.name for f in dataclasses.fields(getattr(cfg, section))} - {"enabled"}
        assert keys <= {f.name for f in dataclasses.fields(cls)}, section
        assert isinstance(getattr(cfg, section).to_config(), cls)
    lora, prefix = cfg.lora.to_config(), cfg.prefix.to_config()
    assert (lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8.0, 0.1, "all-linear")
    assert prefix.prefix_projection and prefix.encoder_hidden_size is None  # 0 stands for None
    for old, new in (("lora.alpha", "lora.lora_alpha"), ("prefix.projection", "prefix.prefix_projection"),
                     ("kernels.fused_loss", "kernels.loss"), ("kernels.fused_layers", "kernels.norms and kernels.mlp")):
        with pytest.raises(ConfigError, match=rf"unknown config key {old} \(renamed: {new}\)"):
            load_config(None, ["--data.generator=addition", f"--{old}=1"])


def test_kernel_stack_resolved_from_the_kernels_section():
    from fastft.runtime.config import KernelStack

    on = load_config(None, ["--data.generator=addition", "--kernels.mlp=false"]).kernels.stack
    assert on == KernelStack(mlp=False) and on.loss and on.norms
    off = load_config(None, ["--data.generator=addition", "--kernels.enabled=false", "--kernels.loss=true"]).kernels.stack
    assert off == KernelStack.stock() and not any(dataclasses.astuple(off))
    with pytest.raises(dataclasses.FrozenInstanceError):
        off.loss = True
