r"""The Swallow corpus rules (jpllm_jax/corpus): every threshold of every stage, overridable by flag.

  python -m experiments.corpus --input='crawl/*.warc.gz' --output=/data/ja-corpus \
      --config.ng_words_file=ng.txt --config.quality.min_length=400
"""
from __future__ import annotations

import dataclasses

import ml_collections

from jpllm_jax.corpus.pipeline import CorpusConfig


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(CorpusConfig()))
