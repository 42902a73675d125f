r"""Builds a Japanese corpus from Common Crawl WARC files (the Swallow corpus method).

  python -m experiments.corpus --input='path/*.warc.gz' --output=DIR [--executor=ray] [--workers=N]

Writes DIR/<shard>.jsonl.zst (id, url, host, date, text + quality annotations) and DIR/stats.json (per
stage: documents in, kept, dropped by reason). Re-running with the same DIR skips finished shards.
Thresholds and lists: --config.quality.*, --config.normalize.*, --config.minhash.*, --config.ng_words_file,
--config.host_suffixes, --config.ut1_dir (experiments/configs/corpus.py).
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from jpllm_jax.corpus.pipeline import EXECUTORS, CorpusConfig, run

config_flags.DEFINE_config_file("config", "experiments/configs/corpus.py", "Corpus config (a Python file).")
flags.DEFINE_string("input", None, "WARC/WET files: globs, comma-separated.", required=True)
flags.DEFINE_string("output", None, "Output directory.", required=True)
flags.DEFINE_enum("executor", "local", sorted(EXECUTORS), "local: a process pool; ray: Ray tasks.")
flags.DEFINE_integer("workers", None, "Processes / Ray CPUs (default: all cores).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = CorpusConfig.from_dict(FLAGS.config.to_dict())
  result = run(FLAGS.input, FLAGS.output, config, executor=FLAGS.executor, workers=FLAGS.workers)
  summary = {k: result[k] for k in ("records", "documents", "pages_per_s", "seconds")}
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
