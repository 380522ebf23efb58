"""Recipes: the fine-tuning setups beyond instruction tuning, each a module on the runtime's hooks.

A recipe module registers its task (data + loss + eval metric, plus callbacks and optimizer parameter
groups) with ``fastft.runtime.tasks.register_task`` and, where it needs one, a model builder with
``fastft.runtime.models.register_model``. A run names it in its config (``[recipe] module = ...``,
options under ``[recipe.options]``, overridable as ``--recipe.options.key=value``). The TOML files
under ``recipes/`` run them; docs/recipes.md describes each with what it measured.
"""
# recipe TOML (recipes/<name>.toml) -> the module it imports
RECIPES = {
    "text_classification": "fastft.recipes.text_classification",
    "full_finetuning": "fastft.recipes.full_finetuning",
    "rlhf": "fastft.recipes.rlhf",
    "reward_model": "fastft.recipes.reward_model",
    "ppo": "fastft.recipes.rlhf",
    "curriculum": "fastft.recipes.curriculum",
    "multitask": "fastft.recipes.multitask",
    "extractive_qa": "fastft.recipes.extractive_qa",
    "continual": "fastft.recipes.continual",
}
