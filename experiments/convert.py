"""Converts Hugging Face checkpoints to our orbax checkpoints and back.

HF -> orbax (safetensors of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel,
MixtralForCausalLM or DeepseekV3ForCausalLM; `--dtype` casts, default keeps the checkpoint's):

    python -m experiments.convert --hf_dir=/models/Llama-3.1-8B --out=/ckpt/llama3-8b [--dtype=bfloat16]

orbax -> HF, from a directory this command wrote or a training run's WORKDIR (or WORKDIR/checkpoints; the latest
step unless `--step`; shards of at most `--max_shard_size`):

    python -m experiments.convert --ckpt_dir=/runs/cpt --hf_out=/models/cpt-hf [--step=1000]

The HF output is complete when a tokenizer is known (`--tokenizer`, else the copy a training run keeps in
WORKDIR/tokenizer/): weights, config.json and generation_config.json with the tokenizer's special ids,
tokenizer.model and the HF tokenizer files, which transformers, vLLM and lm-evaluation-harness load as they are.
Without one (a directory converted from HF) it has config.json and the weights only, and says so.
"""
from __future__ import annotations

from absl import app, flags, logging

from jpllm_jax import checkpoint, hf
from jpllm_jax.eval import loading

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory to read (HF -> orbax).")
_OUT = flags.DEFINE_string("out", None, "orbax checkpoint directory to write (HF -> orbax).")
_CKPT_DIR = flags.DEFINE_string("ckpt_dir", None, "orbax checkpoint directory to read (orbax -> HF).")
_HF_OUT = flags.DEFINE_string("hf_out", None, "HF checkpoint directory to write (orbax -> HF).")
_STEP = flags.DEFINE_integer("step", None, "orbax step: to read (default latest) or to write (default 0).")
_DTYPE = flags.DEFINE_string("dtype", None, "dtype of the written weights (default: keep the source's).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "largest HF shard, e.g. 5GB or 500MiB.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model for the HF output (default: the run's).")


def _run_tokenizer(ckpt_dir: str) -> str | None:
  """The tokenizer a training run kept beside its checkpoints, or None for a plain checkpoint directory."""
  directory = loading.checkpoint_dir(ckpt_dir)
  workdir = directory.parent if directory.name == "checkpoints" else directory
  try:
    return str(loading.workdir_tokenizer(workdir))
  except FileNotFoundError:
    return None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  to_orbax = _HF_DIR.value is not None and _OUT.value is not None
  to_hf = _CKPT_DIR.value is not None and _HF_OUT.value is not None
  if to_orbax == to_hf or sum(f.value is not None for f in (_HF_DIR, _OUT, _CKPT_DIR, _HF_OUT)) != 2:
    raise app.UsageError("give either --hf_dir and --out (HF -> orbax) or --ckpt_dir and --hf_out (orbax -> HF)")
  if to_orbax:
    config, params = hf.load_pretrained(_HF_DIR.value, dtype=_DTYPE.value)
    checkpoint.save_params(_OUT.value, config, params, step=_STEP.value or 0)
    logging.info("wrote %s (%s) to %s", config.family, config.numerics.param_dtype, _OUT.value)
  else:
    tokenizer = _TOKENIZER.value or _run_tokenizer(_CKPT_DIR.value)
    config, params = checkpoint.load_params(loading.checkpoint_dir(_CKPT_DIR.value), step=_STEP.value)
    hf.save_pretrained(config, params, _HF_OUT.value, dtype=_DTYPE.value, max_shard_size=_MAX_SHARD_SIZE.value,
                       tokenizer=tokenizer)
    if tokenizer:
      logging.info("wrote %s with the tokenizer %s to %s", config.family, tokenizer, _HF_OUT.value)
    else:
      logging.warning("wrote %s to %s without tokenizer files (none known: pass --tokenizer)", config.family,
                      _HF_OUT.value)


if __name__ == "__main__":
  app.run(main)
