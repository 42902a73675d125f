"""The training loop: tokenizer, model, mesh, data, checkpoints, guard and logs, from one ConfigDict.

`train(config, workdir)` is what `python -m experiments.train` runs; the same code runs on one CPU and on
many hosts (each process feeds its shard of the global batch).
"""
from __future__ import annotations

import filecmp
import functools
import itertools
import math
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jpllm_jax import eval as jeval
from jpllm_jax.data import pipeline
from jpllm_jax.eval.loading import WORKDIR_TOKENIZER
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.transformer import param_kinds
from jpllm_jax.parallel import MESH_AXES, check_model_fits_mesh, data_parallel_size, make_mesh, with_rule_overrides
from jpllm_jax.parallel.consistency import assert_replicas_equal
from jpllm_jax.parallel.pipeline_schedule import megatron_bubble
from jpllm_jax.tokenizer import load_tokenizer
from jpllm_jax.tokenizer.train import corpus_texts, train_sentencepiece
from jpllm_jax.train import config as run_config
from jpllm_jax.train import flops, nonfinite
from jpllm_jax.train.checkpointing import TrainCheckpointer, WorkdirLock
from jpllm_jax.train.metrics import MetricsLogger, throughput
from jpllm_jax.train.optimizer import make_optimizer
from jpllm_jax.train.step import (BATCH_KEYS, StepConfig, batch_sharding, init_state, make_eval_step,
                                  make_train_step, nonfinite_leaf_name, pipeline_schedule, state_shardings)


MOE_LOG_KEYS = ("moe_loss", "mtp_loss", "moe_load_max", "moe_load_min", "moe_dropped", "router_bias_norm")
FP8_LOG_KEYS = ("fp8_overflow", "fp8_underflow")  # fractions of FP8 GEMM operands saturating / flushed (models/fp8.py)


class TrainingDiverged(RuntimeError):
  """Raised after `max_bad_steps` consecutive skipped steps."""


class LostProcess(RuntimeError):
  """Another process of a multi-process run died: a collective failed (or the coordinator saw no heartbeat)."""


def parse_sources(spec: str) -> list[tuple[list[str], float]]:
  """`"a.jsonl=0.7,b.jsonl=0.3"` -> [(["a.jsonl"], 0.7), (["b.jsonl"], 0.3)]; a missing weight is 1."""
  sources = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    path, _, weight = part.partition("=")
    sources.append(([path], float(weight) if weight else 1.0))
  if not sources:
    raise ValueError("config.data.sources is empty")
  for paths, _ in sources:
    if not os.path.exists(paths[0]):
      raise FileNotFoundError(f"data source {paths[0]} does not exist")
  return sources


def _is_hf_exportable(path: str) -> bool:
  """Whether `tokenizer.expand.export_hf` can write HF files for the model (BPE, identity normalisation)."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  proto = pb.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  norm = proto.normalizer_spec
  return (proto.trainer_spec.model_type == pb.TrainerSpec.BPE and norm.name in ("identity", "")
          and not norm.remove_extra_whitespaces)


def _base_tokenizer(config) -> str:
  """The tokenizer a continual pre-training run starts from: data.tokenizer, else the HF model's own."""
  from jpllm_jax.tokenizer.hf_model import base_tokenizer_of
  return config.data.tokenizer or base_tokenizer_of(config.init_from_hf)


def _expand_files(config) -> list[str]:
  if config.expand_vocab_from:
    return [p.strip() for p in config.expand_vocab_from.split(",") if p.strip()]
  return [p for paths, _ in parse_sources(config.data.sources) for p in paths]


def _learn_vocab_size(files: list[str], add: int, sample_docs: int = 200_000) -> int:
  """Size of the Japanese BPE model the pieces are chosen from: the corpus's distinct characters (SentencePiece
  needs a piece for each; sampled from the first `sample_docs` documents) plus twice the pieces wanted (many
  learned pieces are already in the base)."""
  chars = set()
  for text in itertools.islice(corpus_texts(files), sample_docs):
    chars.update(text)
  return len(chars) + 2 * add + 16


def _make_tokenizer(config, out: pathlib.Path) -> None:
  """Writes the run's tokenizer.model into `out`: N pieces learned on the base (`expand_vocab`), a copy of
  data.tokenizer or of the HF model's tokenizer, or one trained on the sources; and the HF tokenizer files
  beside it for continual pre-training or export runs with a BPE tokenizer."""
  from jpllm_jax.tokenizer.expand import expand_vocabulary, export_hf
  out.mkdir(parents=True)
  target = out / WORKDIR_TOKENIZER.name
  if config.expand_vocab:
    base, files = _base_tokenizer(config), _expand_files(config)
    logging.info("learning %d Japanese pieces on %s from %s", config.expand_vocab, base, files)
    expand_vocabulary(base, files, config.expand_vocab, str(out),
                      learn_vocab_size=_learn_vocab_size(files, config.expand_vocab))
  elif config.data.tokenizer or config.init_from_hf:
    shutil.copyfile(config.data.tokenizer or _base_tokenizer(config), target)
  else:
    files = [p for paths, _ in parse_sources(config.data.sources) for p in paths]
    logging.info("training a %d-piece tokenizer on %s", config.data.tokenizer_vocab_size, files)
    trained = train_sentencepiece(files, str(out / "spm"), config.data.tokenizer_vocab_size)
    os.replace(trained, target)
  # HF files for runs with an HF side (transformers' import and the export take seconds); any other export
  # derives them from the kept tokenizer.model (`hf.save_pretrained(tokenizer=...)`).
  if (config.init_from_hf or config.export_hf) and _is_hf_exportable(str(target)):
    export_hf(str(target), str(out))


def prepare_tokenizer(config, workdir: pathlib.Path):
  """The run's SentencePiece model, kept in <workdir>/tokenizer/ (tokenizer.model, with the HF tokenizer files
  where `_make_tokenizer` writes them) so that evaluation and export read the workdir alone. Process 0 makes
  it once (into a temporary folder renamed when complete); the others wait. A resumed run reuses it: nothing
  is learned again, and a different data.tokenizer is refused."""
  path = workdir / WORKDIR_TOKENIZER
  legacy = workdir / "tokenizer" / "spm.model"  # runs from before the copy was kept under one name.
  if legacy.exists() and not path.exists():
    return load_tokenizer(str(legacy)), str(legacy)
  if jax.process_index() == 0 and not path.exists():
    partial = workdir / "tokenizer.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _make_tokenizer(config, partial)
    shutil.rmtree(path.parent, ignore_errors=True)
    os.replace(partial, path.parent)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  if config.data.tokenizer and not config.expand_vocab and not filecmp.cmp(config.data.tokenizer, path, False):
    raise ValueError(f"data.tokenizer {config.data.tokenizer} differs from the tokenizer this run trained with "
                     f"({path}); start a new workdir for a new tokenizer")
  return load_tokenizer(str(path)), str(path)


def build_model_config(config, vocab_size: int, tokenizer_path: str = "") -> tuple[ModelConfig, Any]:
  """The ModelConfig (and HF params for continual pre-training) for this run. With `expand_vocab` the HF
  embedding and head grow to the run's tokenizer: base rows kept, each new row the mean of the rows of the
  base pieces it splits into (Swallow), padded to a multiple of `model_vocab_multiple`."""
  if config.init_from_hf:
    from jpllm_jax import hf
    from jpllm_jax.models import vocab
    cfg, params = hf.load_pretrained(config.init_from_hf, dtype=config.model.param_dtype)
    cfg = cfg.replace(dtype=config.model.dtype, remat=config.model.remat)
    if config.expand_vocab:
      n_base, rows = vocab.expansion_rows(_base_tokenizer(config), tokenizer_path)
      cfg, params = vocab.expand_embeddings(cfg, params, n_base + len(rows), rows, base_vocab_size=n_base,
                                            pad_multiple=config.model_vocab_multiple)
      logging.info("vocabulary grown from %d to %d pieces (%d rows with padding)", n_base, n_base + len(rows),
                   cfg.vocab_size)
    if cfg.vocab_size < vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} pieces but the HF model only {cfg.vocab_size} rows; "
                       "expand the model's vocabulary (config.expand_vocab=N)")
    return cfg, params
  fields = dict(config.model)
  if not fields.get("vocab_size"):
    m = config.model_vocab_multiple
    fields["vocab_size"] = int(math.ceil(vocab_size / m) * m)
  return ModelConfig.from_dict(fields), None


def export_final(cfg: ModelConfig, params, tokenizer_path: str, directory: str) -> None:
  """The run's params as a complete HF directory (weights, config, generation config, tokenizer files)."""
  from jpllm_jax import hf
  params = multihost_utils.process_allgather(params) if jax.process_count() > 1 else jax.device_get(params)
  if jax.process_index() == 0:
    hf.save_pretrained(cfg, params, directory, tokenizer=tokenizer_path)
    logging.info("exported the final params as an HF model to %s", directory)


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in BATCH_KEYS}


def evaluate(eval_step, params, make_iter, sharding, max_batches: int, local_shape: tuple[int, int]) -> float:
  """Mean validation loss over exactly `max_batches` global batches. A host whose split runs out feeds
  empty (zero-weight) batches, so every process makes the same number of collective calls."""
  empty = {k: np.zeros(local_shape, np.float32 if k == "weights" else np.int32) for k in BATCH_KEYS}
  it = iter(make_iter())
  ce, n = 0.0, 0.0
  for _ in range(max_batches):
    c, t = eval_step(params, _to_global(next(it, empty), sharding))
    ce, n = ce + float(c), n + float(t)
  return ce / max(n, 1.0)


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (agreed on by all processes)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested]))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _eval_plan(config) -> tuple[list, list[str]] | None:
  """The in-training evaluation's (tasks, scorings), checked before anything is loaded; None when it is off."""
  ec = config.eval
  if not ec.every:
    return None
  if jax.process_count() > 1:
    raise ValueError("eval.every > 0 runs on a single process; evaluate the checkpoints of a multi-host run with "
                     "python -m experiments.eval_curve")
  tasks = jeval.get_tasks(ec.tasks)
  scoring = [s.strip() for s in ec.scoring.split(",") if s.strip()]
  unknown = [s for s in scoring if s not in jeval.SCORINGS]
  if unknown or not scoring:
    raise ValueError(f"unknown eval.scoring {unknown or ec.scoring!r}; use one or more of {jeval.SCORINGS}")
  if not os.path.isdir(ec.data_dir):
    raise FileNotFoundError(f"eval.data_dir {ec.data_dir!r} is not a directory")
  return tasks, scoring


def make_task_eval(config, cfg: ModelConfig, sp, plan):
  """The optional in-training evaluation (`config.eval.every` > 0): params -> `eval/<row>` log fields.

  A small `limit` of Japanese tasks, logged beside the loss; log-likelihood multiple choice gives signal long
  before a small model emits labels. Evaluate full checkpoints with `experiments.eval` / `experiments.eval_curve`.
  """
  if plan is None:
    return None
  ec, (tasks, scoring) = config.eval, plan
  lm = jeval.LanguageModel(cfg, None, sp, batch_size=ec.batch_size, max_len=ec.max_len or None)

  def run(params) -> dict[str, float]:
    lm.params = params  # one model object: its stop table is built once and compilations are reused.
    results = jeval.evaluate(lm, tasks, data_dir=ec.data_dir, shots=ec.shots, limit=ec.limit or None,
                             scoring=scoring, loglik_norm=ec.loglik_norm, n_bootstrap=0, keep_predictions=False)
    out = {f"eval/{name}": row["score"] for name, row in results["scores"].items()}
    if results["average"]:
      out["eval/avg"] = results["average"]["score"]
    return out

  return run


def check_launch(config):
  """Everything a launch can check before it loads a model or writes to the workdir: data and tokenizer paths,
  the HF directory, the evaluation's tasks and scoring, the mesh and its rules, and the batch split.
  Returns (mesh, rules, eval plan)."""
  tc = config.train
  parse_sources(config.data.sources)
  if config.data.tokenizer and not os.path.exists(config.data.tokenizer):
    raise FileNotFoundError(f"data.tokenizer {config.data.tokenizer} does not exist")
  if config.init_from_hf and not os.path.isdir(config.init_from_hf):
    raise FileNotFoundError(f"init_from_hf {config.init_from_hf} is not a directory")
  if config.expand_vocab:
    if not config.init_from_hf:
      raise ValueError("expand_vocab grows an HF model's vocabulary: set init_from_hf too")
    _base_tokenizer(config)  # FileNotFoundError when the HF directory has no tokenizer.model.
    for path in _expand_files(config):
      if not os.path.exists(path):
        raise FileNotFoundError(f"expand_vocab_from file {path} does not exist")
  plan = _eval_plan(config)
  rules = with_rule_overrides(config.mesh.rules)
  mesh = make_mesh({a: config.mesh[a] for a in MESH_AXES})
  if tc.batch_size % (tc.micro_batches * jax.process_count()):
    raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by micro_batches x processes "
                     f"({tc.micro_batches} x {jax.process_count()})")
  dp = data_parallel_size(mesh, rules)
  if tc.batch_size % dp:
    raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the data-parallel size {dp} "
                     f"(the mesh axes of the batch rule, {dict(rules)['batch']})")
  return mesh, rules, plan


def train(config, workdir: str) -> dict[str, Any]:
  """Trains for `config.train.steps` steps (resuming from the latest checkpoint); returns the last log.

  `config` is merged onto `train.config.defaults()`. A launch checks everything it can before it writes
  to `workdir`, so a failed relaunch leaves a run as it was.
  """
  config = run_config.with_defaults(config)
  workdir = pathlib.Path(workdir).absolute()
  tc = config.train
  try:
    mesh, rules, plan = check_launch(config)
    sp, tokenizer_path = prepare_tokenizer(config, workdir)
    cfg, hf_params = build_model_config(config, sp.vocab_size(), tokenizer_path)
    check_model_fits_mesh(cfg, mesh, rules)
    pipe = pipeline_schedule(cfg, mesh, StepConfig(micro_batches=tc.micro_batches, pipeline=tc.pipeline,
                                                   virtual_stages=tc.virtual_stages))
    lock = WorkdirLock(workdir)
    ckpt = TrainCheckpointer(workdir / "checkpoints", cfg, save_every=tc.checkpoint_every,
                             keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  except ValueError as e:  # one line for the launcher: a setting to change, not a bug.
    raise run_config.ConfigError(str(e)) from e
  task_eval = make_task_eval(config, cfg, sp, plan)
  start = ckpt.latest_step()
  if jax.process_index() == 0:  # the settings of the run, for evaluation and provenance.
    run_config.write_run_config(workdir, config, start or 0)

  local_batch = tc.batch_size // jax.process_count()
  o = config.optim
  tx, schedule = make_optimizer(o.lr, o.warmup_steps, tc.steps, kinds=param_kinds(cfg),
                                **{k: o[k] for k in ("min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm")})
  step_cfg = StepConfig(z_loss=o.z_loss, micro_batches=tc.micro_batches, spike_factor=tc.spike_factor,
                        mtp_loss_coef=o.mtp_loss_coef, router_bias_rate=o.router_bias_rate,
                        pipeline=tc.pipeline, virtual_stages=tc.virtual_stages)
  shardings = state_shardings(cfg, tx, mesh, rules)
  init_fn = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shardings)
  params = None if hf_params is None else jax.device_put(hf_params, shardings["params"])
  state = init_fn(jax.random.key(config.seed), params)

  # Data shards are independent of the process count: a run reads the same global batches on 1 host as on
  # `data.shards` hosts (each process reads its shards side by side).
  shard_count = config.data.shards or jax.process_count()
  data_kwargs = dict(sources=parse_sources(config.data.sources), tokenizer=sp, seq_len=config.data.seq_len,
                     batch_size=local_batch, seed=config.seed, val_fraction=config.data.val_fraction,
                     shards=pipeline.local_shards(shard_count), shard_count=shard_count)
  train_iter = pipeline.ShardsIterator(split="train", **data_kwargs)
  make_val_iter = lambda: pipeline.ShardsIterator(split="validation", **data_kwargs)
  data_counts = pipeline.source_stats(data_kwargs["sources"])  # bad lines skipped, logged with every record.

  if start is not None:
    state = ckpt.restore(start, state, train_iter)
    logging.info("resumed from step %d", start)
  start = int(state["step"])

  step_fn = make_train_step(cfg, tx, schedule, step_cfg, mesh, rules)
  eval_step = make_eval_step(cfg, mesh, rules)
  bsh = batch_sharding(mesh, rules)
  flops_per_token = flops.train_flops_per_token(cfg, config.data.seq_len)
  peak = tc.peak_tflops * 1e12 or None  # no peak given: no MFU (a peak timed on a busy machine misleads).
  logger = MetricsLogger(workdir, resume_step=start)
  if start == 0:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    logging.info("model %s, %.2fM params, %.3g FLOPs/token, peak %s, mesh %s, tokenizer %s",
                 cfg.family, n_params / 1e6, flops_per_token, f"{peak:.3g} FLOP/s" if peak else "not given",
                 dict(mesh.shape), tokenizer_path)
    if pipe is not None:
      logging.info("pipeline %s: S=%d V=%d M=%d, bubble %.4f (Megatron's (S-1)/(V*M+S-1) = %.4f)", pipe.kind,
                   pipe.stages, pipe.virtual, pipe.micro_batches, pipe.bubble_fraction,
                   megatron_bubble(pipe.stages, pipe.micro_batches, pipe.virtual))

  preempt = _Preemption()
  on_nonfinite = nonfinite.OnNonFinite(tc.on_nonfinite, cfg, workdir, mesh=mesh, rules=rules, z_loss=o.z_loss,
                                       micro_batches=tc.micro_batches, mtp_loss_coef=o.mtp_loss_coef)
  bad_streak, skipped_total, last = 0, 0, {}
  window_tokens, window_start = 0.0, time.perf_counter()
  pending = None  # (step, metrics, batch) of the previous step, checked one step late so that dispatch stays async.
  try:
    stop = min(tc.steps, tc.stop_after) if tc.stop_after else tc.steps
    step = start
    while step < stop:
      batch = _to_global(next(train_iter), bsh)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        roll_back = on_nonfinite(*pending, state["params"])
        bad_streak = _check_guard(cfg, *pending[:2], bad_streak, tc.max_bad_steps)
        skipped_total += bad_streak > 0
        if roll_back:
          state, logger = _roll_back(ckpt, pending[0], state, lambda: init_fn(jax.random.key(config.seed), params),
                                     logger, workdir, step)
          step, pending, bad_streak, on_nonfinite.rollbacks = int(state["step"]), None, 0, on_nonfinite.rollbacks + 1
          continue
      pending = (step, metrics, batch)
      if tc.consistency_every and (step + 1) % tc.consistency_every == 0:
        assert_replicas_equal({"params": state["params"], "opt_state": state["opt_state"]}, f"after step {step + 1}")
      window_tokens += config.data.seq_len * tc.batch_size
      done = step + 1
      eval_due = tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps)
      task_eval_due = task_eval is not None and (done % config.eval.every == 0 or done == tc.steps)
      if done % tc.log_every == 0 or done == tc.steps or eval_due or task_eval_due:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        tps = window_tokens / elapsed
        last = {k: float(metrics[k]) for k in ("loss", "ce", "z_loss", "grad_norm", "lr")}
        last.update({k: float(metrics[k]) for k in MOE_LOG_KEYS + FP8_LOG_KEYS if k in metrics})
        if "expert_load" in metrics:  # the load histogram: each routed layer's fraction of assignments per expert.
          last["expert_load"] = np.round(np.asarray(metrics["expert_load"], np.float64), 5).tolist()
        last.update(skipped=int(metrics["skipped"]), skipped_total=skipped_total + int(metrics["skipped"]),
                    rollbacks=on_nonfinite.rollbacks,
                    **throughput(tps, flops_per_token, peak),
                    tokens_seen=done * config.data.seq_len * tc.batch_size, **data_counts)
        if eval_due:
          last["val_loss"] = evaluate(eval_step, state["params"], make_val_iter, bsh, tc.eval_batches,
                                      (local_batch, config.data.seq_len))
        if task_eval_due:
          last.update(task_eval(state["params"]))
        logger.write(done, last)
        window_tokens, window_start = 0.0, time.perf_counter()
      if ckpt.save(done, state, train_iter, force=done == stop):  # and always the last step of the run.
        logging.info("checkpoint of step %d saving to %s", done, ckpt.directory / str(done))
      if preempt.should_stop():
        logging.warning("SIGTERM: saving step %d and stopping", done)
        ckpt.save(done, state, train_iter, force=True)
        break
      step += 1
    if pending is not None:  # the last step: located, and stopped on; no step is left to roll back into.
      on_nonfinite(*pending, state["params"])
      _check_guard(cfg, *pending[:2], bad_streak, tc.max_bad_steps)
    if config.export_hf:
      export_final(cfg, state["params"], tokenizer_path, config.export_hf)
  except Exception as e:
    if jax.process_count() > 1 and (cause := _lost_peer(e)):  # its collectives cannot complete: no final save.
      # Host values only: the device state is the failed computation's.
      lost = LostProcess(f"a process of this {jax.process_count()}-process run is gone ({cause}); stopped at step "
                         f"{step + 1}; restart every process: the run resumes from its last checkpoint "
                         f"(step {ckpt.latest_step()})")
      raise lost from e
    raise
  finally:
    preempt.restore()
    try:
      if not isinstance(sys.exc_info()[1], LostProcess):
        ckpt.close()
    finally:
      logger.close()
      lock.release()
  return last


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
             "heartbeat timeout", "stopped sending heartbeats", "Gloo")


def _lost_peer(error: BaseException) -> str | None:
  """The first line naming a lost process in `error` or its causes (gloo on CPU, the coordination service)."""
  while error is not None:
    for line in str(error).splitlines():
      if any(p in line for p in LOST_PEER):
        return line.strip()[:300]
    error = error.__cause__ or error.__context__
  return None


def _roll_back(ckpt: TrainCheckpointer, bad: int, state, initial, logger: MetricsLogger, workdir: pathlib.Path,
               step: int):
  """`train.on_nonfinite=rollback` after the non-finite step `bad` (0-based) while step `step` ran: the newest good
  checkpoint at or before it (none: the initial state), its later checkpoints and metrics records dropped; the
  data iterator goes on, so the batches of the steps since the checkpoint are skipped."""
  restored = ckpt.roll_back(bad, state)
  state = initial() if restored is None else restored
  back = int(state["step"])
  logging.warning("step %d not finite: rolled back to step %d, skipping the %d batches of steps %d-%d", bad + 1, back,
                  step + 1 - back, back + 1, step + 1)
  logger.close()
  return state, MetricsLogger(workdir, resume_step=back)


def _check_guard(cfg: ModelConfig, step: int, metrics, bad_streak: int, max_bad: int) -> int:
  """Logs a skipped step; raises after `max_bad` consecutive ones, naming the first non-finite tensor."""
  if not int(metrics["skipped"]):
    return 0
  bad_streak += 1
  leaf = int(metrics["first_nonfinite_leaf"])
  if not int(metrics["nonfinite"]):
    what = f"loss spike ({float(metrics['loss']):.4f})"
  elif leaf >= 0:
    what = f"non-finite gradient, first in params{nonfinite_leaf_name(cfg, leaf)}"
  else:
    what = f"non-finite loss ({float(metrics['loss'])})"
  logging.warning("step %d skipped: %s (%d in a row)", step + 1, what, bad_streak)
  if bad_streak >= max_bad:
    raise TrainingDiverged(f"{bad_streak} consecutive bad steps, the last at step {step + 1}: {what}")
  return bad_streak
