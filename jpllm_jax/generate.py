"""Batched greedy and sampled decoding with a KV cache.

    from jpllm_jax.generate import generate
    outputs = generate(config, params, [[1, 523, 99], [1, 7]], max_new_tokens=32, eos_id=2)

Prompts of different lengths are left-padded to a common length (rounded up to `pad_multiple` so that
few shapes are compiled); padding has segment id 0 and is never attended to, and positions count only
real tokens, so every row decodes exactly as it would alone. Prefill and the whole decoding loop run in
one jitted function (`jax.lax.while_loop`, stopping early once every row has produced `eos_id`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.transformer import forward_cached, init_cache


def sample_logits(logits_BV, rng, *, temperature: float, top_k: int | None, top_p: float | None):
  """Next tokens [B] from logits: argmax when temperature == 0, else top-k / nucleus sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose probability reaches top_p (the first token is always kept).
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _decode(cfg: ModelConfig, params, tokens_BP, segment_BP, rng, eos_id, *, max_new_tokens: int,
            temperature: float, top_k: int | None, top_p: float | None):
  b, p = tokens_BP.shape
  positions = jnp.maximum(jnp.cumsum(segment_BP, axis=1) - 1, 0).astype(jnp.int32)
  lengths = segment_BP.sum(axis=1).astype(jnp.int32)
  cache = init_cache(cfg, b, p + max_new_tokens)
  logits, cache = forward_cached(cfg, params, tokens_BP, cache, 0, positions=positions, segment_ids=segment_BP)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  rng, key = jax.random.split(rng)
  first = sample(logits[:, -1], key)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = first == eos_id

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, last, out, done, rng = state
    ones = jnp.ones((b, 1), jnp.int32)
    logits, cache = forward_cached(cfg, params, last[:, None], cache, p + step - 1,
                                   positions=(lengths + step - 1)[:, None], segment_ids=ones)
    rng, key = jax.random.split(rng)
    nxt = sample(logits[:, -1], key)
    nxt = jnp.where(done, eos_id, nxt)  # finished rows only repeat eos (trimmed on the host).
    out = out.at[:, step].set(nxt)
    return step + 1, cache, nxt, out, done | (nxt == eos_id), rng

  state = (jnp.int32(1), cache, first, out, done, rng)
  step, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
  return out, step


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, rng: jax.Array | None = None, pad_id: int = 0,
             pad_multiple: int = 16) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens; returns the new tokens only.

  Greedy when `temperature == 0` (the default). A row stops after emitting `eos_id`, which is kept as
  its last token. Sampling needs `rng` for reproducibility (defaults to key 0).
  """
  if not prompts:
    return []
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  longest = max(len(p) for p in prompts)
  if cfg.learned_positions and longest + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"{cfg.max_seq_len} learned positions")
  width = -(-longest // pad_multiple) * pad_multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  for i, prompt in enumerate(prompts):
    tokens[i, width - len(prompt):] = prompt
    segments[i, width - len(prompt):] = 1
  rng = jax.random.key(0) if rng is None else rng
  eos = -1 if eos_id is None else eos_id
  out, steps = _decode(cfg, params, jnp.asarray(tokens), jnp.asarray(segments), rng, jnp.int32(eos),
                       max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=top_p)
  out = np.asarray(out)[:, :int(steps)]
  results = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    results.append(row)
  return results
