"""Hugging Face checkpoint interop: Llama, Mistral, Qwen2, GPT-2, Mixtral and DeepSeek-V3 safetensors <-> our params.

    config, params = hf.load_pretrained("path/to/hf_dir", dtype="bfloat16")  # numpy arrays
    hf.save_pretrained(config, params, "path/to/out")  # loads in transformers.AutoModelForCausalLM

`mapping.py` holds the config translation and the tensor table of each family; `io.py` streams tensors.
"""
from jpllm_jax.hf.io import load_pretrained, save_pretrained
from jpllm_jax.hf.mapping import config_from_hf, config_to_hf

__all__ = ["config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained"]
