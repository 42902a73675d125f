"""A model as the harness sees it: batched greedy generation and batched log-likelihood of continuations.

    lm = LanguageModel(cfg, params, sp, batch_size=8)
    texts = lm.generate(prompts, max_new_tokens=15)                      # stops at a blank line or EOS
    scores = lm.loglikelihood([(context, ["choice a", "choice b"]), ...])  # per choice: ChoiceScore

Both sort requests by length and run fixed-shape batches (the batch padded with dummy rows, prompts
left-padded to a few bucket widths) so that a run compiles a handful of shapes. Log-likelihood runs the
shared context once with the KV cache and every choice against that cache (`jax.lax.map` over choices).

Tokenisation follows the lm-evaluation-harness: the continuation's tokens are those of
`encode(context + choice)` after the longest prefix it shares with `encode(context)`, so a piece that
straddles the boundary is scored with the choice. BOS is prepended when the tokenizer has one.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from jpllm_jax.generate import generate
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.transformer import forward_cached, init_cache
from jpllm_jax.tokenizer import stop_string_table

BUCKETS = (64, 128, 192, 256, 320, 384, 448, 512)  # then multiples of 128: at most 128 pad tokens per row.


def bucket(n: int, multiple: int = 128) -> int:
  """The padded width of a batch whose longest prompt has n tokens: few compiled shapes, little padding."""
  for b in BUCKETS:
    if n <= b:
      return b
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ChoiceScore:
  logprob: float  # sum of the continuation tokens' log-probabilities
  tokens: int  # number of continuation tokens
  is_greedy: bool  # every continuation token is the argmax


@dataclasses.dataclass
class Counters:
  truncated_prompts: int = 0  # prompts cut from the left to fit max_len


class LanguageModel:
  """Greedy generation and continuation log-likelihoods of one model and tokenizer."""

  def __init__(self, cfg: ModelConfig, params: Any, tokenizer: spm.SentencePieceProcessor, *, batch_size: int = 8,
               max_len: int | None = None, add_bos: bool = True):
    if tokenizer.get_piece_size() > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.get_piece_size()} pieces but the model only {cfg.vocab_size} "
                       "embedding rows")
    self.cfg, self.params, self.sp = cfg, params, tokenizer
    self.batch_size = batch_size
    self.max_len = max_len or cfg.max_seq_len
    self.bos = [tokenizer.bos_id()] if add_bos and tokenizer.bos_id() >= 0 else []
    self.eos_id = tokenizer.eos_id() if tokenizer.eos_id() >= 0 else None
    self.stop_table = stop_string_table(tokenizer, "\n\n", cfg.vocab_size)
    self.counters = Counters()

  def encode(self, text: str) -> list[int]:
    return self.bos + self.sp.encode(text)

  def _fit(self, ids: list[int], room: int) -> list[int]:
    """Left-truncates `ids` (keeping BOS) so that `room` more tokens fit in max_len."""
    limit = self.max_len - room
    if limit < len(self.bos) + 1:
      raise ValueError(f"max_len={self.max_len} leaves no room for a prompt and {room} tokens")
    if len(ids) <= limit:
      return ids
    self.counters.truncated_prompts += 1
    return self.bos + ids[len(ids) - (limit - len(self.bos)):]

  # ------------------------------------------------------------------------------------------- generation
  def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (text), stopped at EOS or at the first blank line ("\\n\\n" is kept)."""
    encoded = [self._fit(self.encode(p), max_new_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      rows = [encoded[i] for i in idx]
      rows += [rows[-1]] * (self.batch_size - len(rows))  # a fixed batch shape; dummy rows are dropped.
      width = min(bucket(len(rows[0])), self.max_len - max_new_tokens)
      outs = generate(self.cfg, self.params, rows, max_new_tokens=max_new_tokens, eos_id=self.eos_id,
                      pad_to=width, stop_table=self.stop_table)
      for i, out in zip(idx, outs):
        if self.eos_id is not None and out and out[-1] == self.eos_id:
          out = out[:-1]
        texts[i] = self.sp.decode(out)
    return texts

  # ------------------------------------------------------------------------------------------ log-likelihood
  def _split(self, context: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    if not choices:
      raise ValueError("a multiple-choice request needs at least one choice")
    ctx = self.encode(context)
    wholes = [self.encode(context + c) for c in choices]
    n = len(ctx)
    for whole in wholes:
      common = 0
      while common < min(n, len(whole) - 1) and whole[common] == ctx[common]:
        common += 1
      n = common
    if n == 0:
      raise ValueError("the context encodes to no tokens (and the tokenizer has no BOS)")
    return ctx[:n], [w[n:] for w in wholes]

  def loglikelihood(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[ChoiceScore]]:
    """For each (context, choices): the log-likelihood of every choice as the continuation of the context."""
    split = [self._split(c, ch) for c, ch in requests]
    longest_cont = max((len(t) for _, conts in split for t in conts), default=1)
    cont_width = -(-longest_cont // 8) * 8
    split = [(self._fit(prefix, cont_width), conts) for prefix, conts in split]
    n_choices = max(len(conts) for _, conts in split)
    order = sorted(range(len(split)), key=lambda i: -len(split[i][0]))
    results: list[list[ChoiceScore]] = [[] for _ in split]
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      rows = [split[i] for i in idx] + [split[idx[-1]]] * (self.batch_size - len(idx))
      width = min(bucket(len(rows[0][0])), self.max_len - cont_width)
      prefix = np.zeros((self.batch_size, width), np.int32)
      prefix_seg = np.zeros((self.batch_size, width), np.int32)
      cont = np.zeros((self.batch_size, n_choices, cont_width), np.int32)
      mask = np.zeros((self.batch_size, n_choices, cont_width), bool)
      for r, (ids, conts) in enumerate(rows):
        prefix[r, width - len(ids):] = ids
        prefix_seg[r, width - len(ids):] = 1
        for j, c in enumerate(conts):
          cont[r, j, :len(c)] = c
          mask[r, j, :len(c)] = True
      logprob, greedy = _choice_logprobs(self.cfg, self.params, jnp.asarray(prefix), jnp.asarray(prefix_seg),
                                         jnp.asarray(cont), jnp.asarray(mask))
      logprob, greedy = np.asarray(logprob), np.asarray(greedy)
      for r, i in enumerate(idx):
        conts = split[i][1]
        results[i] = [ChoiceScore(float(logprob[r, j]), len(conts[j]), bool(greedy[r, j]))
                      for j in range(len(conts))]
    if self.counters.truncated_prompts:
      logging.warning("%d prompts were cut from the left to fit max_len=%d", self.counters.truncated_prompts,
                      self.max_len)
    return results


@functools.partial(jax.jit, static_argnames=("cfg",))
def _choice_logprobs(cfg: ModelConfig, params, prefix_BP, prefix_seg_BP, cont_BKC, mask_BKC):
  """Sum of continuation log-probs [B, K] and whether each continuation is greedy [B, K]."""
  b, p = prefix_BP.shape
  c = cont_BKC.shape[2]
  positions = jnp.maximum(jnp.cumsum(prefix_seg_BP, axis=1) - 1, 0).astype(jnp.int32)
  lengths = prefix_seg_BP.sum(axis=1).astype(jnp.int32)
  cache = init_cache(cfg, b, p + c)
  logits, cache = forward_cached(cfg, params, prefix_BP, cache, 0, positions=positions, segment_ids=prefix_seg_BP,
                                 last_only=True)
  last = logits[:, -1:].astype(jnp.float32)  # predicts each continuation's first token
  cont_positions = lengths[:, None] + jnp.arange(c, dtype=jnp.int32)[None]

  def one_choice(args):
    cont_BC, mask_BC = args
    out, _ = forward_cached(cfg, params, cont_BC, cache, p, positions=cont_positions,
                            segment_ids=jnp.ones_like(cont_BC))
    logp = jax.nn.log_softmax(jnp.concatenate([last, out[:, :-1].astype(jnp.float32)], axis=1), axis=-1)
    token_lp = jnp.take_along_axis(logp, cont_BC[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logp, axis=-1) == cont_BC
    return (jnp.where(mask_BC, token_lp, 0.0).sum(axis=1), jnp.all(greedy | ~mask_BC, axis=1))

  lp_KB, greedy_KB = jax.lax.map(one_choice, (cont_BKC.transpose(1, 0, 2), mask_BKC.transpose(1, 0, 2)))
  return lp_KB.T, greedy_KB.T
