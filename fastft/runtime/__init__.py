"""fastft's training runtime on torch's own engines (docs/runtime.md). ``fastft train RUN.toml`` is the
command line; from Python::

    from fastft.runtime.config import load_config
    from fastft.runtime.trainer import Trainer

    summary = Trainer(load_config("recipes/instruction_tuning.toml", ["--run.max_steps=10"])).fit()

Submodules are imported on use, so ``import fastft.runtime`` brings in neither transformers nor peft.
"""
