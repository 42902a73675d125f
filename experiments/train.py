r"""Launches a training run.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/jpllm-default
  python -m experiments.train --config=experiments/configs/default.py --workdir=DIR \
      --config.train.steps=2000 --config.mesh.fsdp=-1 --config.mesh.data=1

Multi-host: start the same command on every host with --coordinator=HOST:PORT --num_processes=N
--process_id=I (or --coordinator=auto on TPU pods and Slurm clusters). Re-running with the same workdir
resumes from the latest checkpoint; SIGTERM saves a checkpoint and exits.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jpllm_jax import cpu
from jpllm_jax.parallel import initialize_distributed

config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Training config (a Python file).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard, tokenizer.",
                    required=True)
flags.DEFINE_string("coordinator", None, "Multi-host: coordinator address host:port, or 'auto'.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from jpllm_jax.train.loop import train  # after jax.distributed is up.
  logging.info("config:\n%s", FLAGS.config)
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cpu.use_huge_pages()  # re-executes with glibc huge pages for XLA's buffers (JPLLM_NO_HUGE_PAGES=1: off).
  app.run(main)
