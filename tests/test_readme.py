"""The README's python snippets run as they stand (tiny config-built models, no network), and every
public module is reachable from ``import fastft`` without importing transformers or peft.

Each ```python block of README.md is one test, named after the heading above it, run in a fresh
namespace in a temporary directory (files the snippet saves land there; ``docs/`` is linked in for the
examples). A block preceded by the line ``<!-- readme-test: skip -->`` is not run (e.g. one that needs a
download or a GPU).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARK = "<!-- readme-test: skip -->"


def _snippets() -> list:
    """[(id, code)] of the README's python blocks, the id from the nearest heading above."""
    lines = README.read_text().splitlines()
    found, heading, i = [], "top", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
        if line.strip() == "```python":
            end = lines.index("```", i + 1)
            skipped = i > 0 and lines[i - 1].strip() == SKIP_MARK
            if not skipped:
                name = heading if heading not in (n for n, _ in found) else f"{heading}-{len(found)}"
                found.append((name, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found


SNIPPETS = _snippets()


def test_readme_has_a_snippet_per_feature():
    code = "\n".join(c for _, c in SNIPPETS)
    for api in ("fastft.ops.cross_entropy", "tuners.LoraConfig", "handle.save", "tuners.load", ".merge()",
                "lora.from_peft", "lora.merge_and_unload", "patch_causal_lm_loss", "tuners.BottleneckConfig",
                "tuners.PrefixTuningConfig", "handle.remove()", "fastft.patch(", "kl_penalty", "full_kl",
                "linear_full_kl", "grpo_step.py"):
        assert api in code, f"no README snippet uses {api}"


@pytest.mark.parametrize("code", [c for _, c in SNIPPETS], ids=[n for n, _ in SNIPPETS])
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    (tmp_path / "docs").symlink_to(ROOT / "docs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})


def test_every_public_module_reachable_from_import_fastft_lazily():
    """`import fastft` alone gives every public module as an attribute; transformers and peft come in
    only when a module that needs them is used."""
    code = (
        "import sys, fastft\n"
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, 'import fastft pulled in HF'\n"
        "for name in ('backend', 'ops', 'nn', 'reference', 'tuners', 'integrations', "
        "'runtime', 'recipes', 'rl'):\n"
        "    assert type(getattr(fastft, name)).__name__ == 'module', name\n"
        "    assert name in dir(fastft), name\n"
        "assert callable(fastft.integrations.causal_lm_loss.patch_causal_lm_loss)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
