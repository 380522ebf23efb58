"""Recipes: the fine-tuning setups beyond instruction tuning, each a module on the runtime's hooks.

A recipe module registers its task (data + loss + eval metric, plus callbacks and optimizer parameter
groups) with ``fastft.runtime.tasks.register_task`` and, where it needs one, a model builder with
``fastft.runtime.models.register_model``. A run names it in its config, ``[recipe] module = ...``; the
TOML files under ``recipes/`` and docs/recipes.md describe each one.
"""
RECIPES = {
    "text_classification": "fastft.recipes.text_classification",
}
