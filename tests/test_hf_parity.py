"""HF parity: our float32 logits match transformers' on padded batches, for every supported family.

Run with `-s` to see the measured max |logit diff| per variant (also recorded as a junit property).
"""
from __future__ import annotations

import numpy as np
import pytest

from hf_helpers import VARIANTS, hf_logits, max_diff, our_logits, padded_batch, save_hf_model
from jpllm_jax import hf

TOLERANCE = 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, tmp_path, record_property):
  model = save_hf_model(variant, tmp_path)
  cfg, params = hf.load_pretrained(tmp_path)
  tokens, mask = padded_batch(cfg.vocab_size)
  ref = hf_logits(model, tokens, mask)
  ours = our_logits(cfg, params, tokens, mask)
  diff = max_diff(ours, ref, mask)
  record_property("max_abs_logit_diff", diff)
  print(f"\n[hf parity] {variant}: max |logit diff| = {diff:.3g} (logits up to {np.abs(ref).max():.3g})")
  assert diff <= TOLERANCE, f"{variant}: max abs logit diff {diff:.3g} > {TOLERANCE}"
  if cfg.attention.sliding_window is not None:  # The window must matter at this length, or the test proves nothing.
    no_window = our_logits(cfg.replace(sliding_window=None), params, tokens, mask)
    assert max_diff(no_window, ref, mask) > 1e-2
