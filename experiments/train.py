r"""Launches a training run.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/jpllm-default
  python -m experiments.train --config=experiments/configs/default.py --workdir=DIR \
      --config.train.steps=2000 --config.mesh.fsdp=-1 --config.mesh.data=1
  python -m experiments.train --config=experiments/configs/cpt_swallow.py --workdir=/tmp/jpllm-cpt \
      --config.export_hf=/tmp/jpllm-cpt-hf   # continual pre-training with N new Japanese pieces, then export

Continual pre-training is one command: `--config.init_from_hf=DIR --config.expand_vocab=N` learns N Japanese
pieces on DIR's tokenizer (from `--config.expand_vocab_from=FILES`, default the data sources) into
WORKDIR/tokenizer/, grows the embedding and head and trains on; `--config.export_hf=OUT` writes the final
params as a complete HF directory.

Multi-host: start the same command on every host with --coordinator=HOST:PORT --num_processes=N
--process_id=I (or --coordinator=auto on TPU pods and Slurm clusters). Re-running with the same workdir
resumes from the latest checkpoint; SIGTERM saves a checkpoint and exits. A config typo stops the launch with
one line ("unknown field model.d_modle; did you mean d_model?") before anything is loaded or written.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jpllm_jax import cpu
from jpllm_jax.parallel import initialize_distributed


def _one_line(error: Exception, argv: list[str]) -> str:
  """ml_collections' error for an unknown `--config.a.b` override, as "unknown field a.b; did you mean c?"."""
  text = str(error)
  m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  key = m.group(2) if m else re.search(r"\w+", text).group(0)
  for arg in argv:
    parts = arg.split("=", 1)[0].removeprefix("--config.").split(".")
    if arg.startswith("--config.") and key in parts:
      hint = f"; did you mean {m.group(1)}?" if m else ""
      return f"unknown field {'.'.join(parts[:parts.index(key) + 1])}{hint}"
  return text.splitlines()[0]


try:  # ml_collections applies the --config.* overrides here already.
  config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Training config (a Python file).")
except (KeyError, AttributeError) as e:
  sys.exit(f"error: {_one_line(e, sys.argv)}")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard, tokenizer.",
                    required=True)
flags.DEFINE_string("coordinator", None, "Multi-host: coordinator address host:port, or 'auto'.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_bool("verbose", False, "Show the libraries' info logs (orbax's per-save lines) too.")
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError) as e:  # how ml_collections reports an unknown override field.
    sys.exit(f"error: {_one_line(e, argv)}")
  except flags.Error as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")


def main(argv):
  del argv
  from jpllm_jax.train.metrics import console
  console(FLAGS.verbose)
  initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from jpllm_jax.train.config import ConfigError
  from jpllm_jax.train.loop import LostProcess, train  # after jax.distributed is up.
  logging.info("config:\n%s", FLAGS.config)
  try:
    train(FLAGS.config, FLAGS.workdir)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  except LostProcess as e:  # exit now: jax.distributed's shutdown would wait on the dead process's heartbeat.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)


if __name__ == "__main__":
  cpu.use_huge_pages()  # re-executes with glibc huge pages for XLA's buffers (JPLLM_NO_HUGE_PAGES=1: off).
  app.run(main, flags_parser=parse_flags)
