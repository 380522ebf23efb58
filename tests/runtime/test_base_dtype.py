"""model.dtype = "auto": bf16 for the frozen base where the CPU computes bf16 natively, else fp32, the choice printed."""
import torch

from fastft.runtime import models
from fastft.runtime.config import Config, replace


def auto_config():
    return replace(Config(), model={"builder": "tiny_llama", "dtype": "auto"}, data={"generator": "addition"})


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert models.base_dtype(auto_config()) is torch.bfloat16
    assert "model.dtype = auto: bfloat16 (this CPU computes bf16 natively (avx512_bf16))" in capsys.readouterr().out


def test_auto_keeps_fp32_without_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "fma"})
    assert models.base_dtype(auto_config()) is torch.float32
    out = capsys.readouterr().out
    assert "model.dtype = auto: float32 (this CPU has no native bf16" in out and "--model.dtype=" in out


def test_explicit_dtype_is_kept_and_silent(capsys):
    cfg = replace(Config(), model={"builder": "tiny_llama", "dtype": "bfloat16"}, data={"generator": "addition"})
    assert models.base_dtype(cfg) is torch.bfloat16
    assert capsys.readouterr().out == ""


def test_tiny_model_is_built_in_the_auto_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"amx_bf16"})
    model, _ = models.build_model(auto_config())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_set_dtype_is_announced_with_what_auto_would_pick(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    cfg = replace(Config(), model={"builder": "tiny_llama", "dtype": "float32"}, data={"generator": "addition"})
    assert models.base_dtype(cfg, announce=True) is torch.float32
    out = capsys.readouterr().out
    assert out.startswith("model.dtype = float32 (set by the config; auto would pick float32 here: this CPU has no "
                          "native bf16")
