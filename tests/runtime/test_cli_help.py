"""`fastft train --help`, docs/runtime.md's key table and `fastft --help`: generated from one source (the
config dataclasses), so they cannot drift apart."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fastft import __main__ as entry
from fastft.runtime import cli, config, config_docs

ROOT = Path(__file__).resolve().parents[2]


def all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in config_docs.sections().items() for f in dataclasses.fields(cls)]


def test_every_key_has_a_docstring():
    missing = [row.key for row in config_docs.key_docs() if not row.doc]
    assert not missing, f"config keys without a docstring under their field in fastft/runtime/config.py: {missing}"


def test_every_section_has_a_docstring():
    missing = [name for name in config_docs.sections() if not config_docs.section_doc(name)]
    assert not missing, f"config sections without a class docstring: {missing}"


def test_help_lists_every_key_with_default_and_choices(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for key in all_keys():
        assert f"--{key}=" in text, key
    for key, choices in config.CHOICES.items():
        assert f"--{key}={{{','.join(choices)}}}" in text, key
    default_lr = config.OptimConfig().lr
    assert f"--optim.lr=FLOAT  (default: {default_lr!r})" in text
    assert '--parallel.mode={ddp,zero1,zero2,fsdp2,hsdp}  (default: "ddp")' in text


def test_help_of_one_section(capsys):
    assert cli.main(["--help", "optim"]) == 0
    text = capsys.readouterr().out
    assert "--optim.lr=" in text and "--run.seed=" not in text
    assert cli.main(["--help", "nonsense"]) == 2
    assert "unknown config section 'nonsense'" in capsys.readouterr().err


def test_docs_table_is_the_generated_one():
    text = (ROOT / "docs" / "runtime.md").read_text()
    assert config_docs.documented_table(text) == config_docs.docs_block(), \
        "docs/runtime.md's config table is stale: run python -m fastft.runtime.config_docs --write"
    for key in all_keys():
        assert f"| `{key}` |" in text, key


def test_docs_table_lists_each_default():
    table = config_docs.markdown_table()
    for row in config_docs.key_docs():
        assert f"| `{row.key}` | " in table and f"`{config_docs.format_value(row.default)}`" in table


def test_field_docstrings_reads_the_string_under_each_field():
    @dataclasses.dataclass
    class Example:
        documented: int = 1
        """what it is
        over two lines"""
        bare: int = 2

    assert config_docs.field_docstrings(Example) == {"documented": "what it is over two lines"}


@pytest.mark.parametrize("argv0", ["fastft", "python -m fastft"])
def test_console_script_and_module_list_the_same_subcommands(argv0, capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--help"], prog=argv0)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {argv0} ")
    for name in entry.SUBCOMMANDS:
        assert f"    {name} " in text, name


def test_python_dash_m_fastft_help_names_train_and_info():
    out = subprocess.run([sys.executable, "-m", "fastft", "--help"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert out.startswith("usage: python -m fastft") and "train" in out and "info" in out
