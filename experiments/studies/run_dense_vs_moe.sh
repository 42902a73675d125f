#!/bin/bash
# Study 3 end to end (see dense_vs_moe.py): ./experiments/studies/run_dense_vs_moe.sh [WORKDIR] [TOKENIZER],
# from the repository root. Finished runs resume at their end; evaluated checkpoints are skipped.
set -euo pipefail
W=${1:-/tmp/studies/dense_vs_moe}
TOK=${2:-/tmp/studies/tok_ja8k/tokenizer.model}
PY=${PYTHON:-python}
[ -f $TOK ] || $PY -m experiments.tokenizer train --input=../shared/data/text_ja/pretrain_ja.jsonl \
    --vocab_size=8000 --output=$(dirname $TOK)
for kind in moe dense; do
  $PY -m experiments.train --config=experiments/studies/dense_vs_moe.py:$kind --workdir=$W/$kind \
      --config.data.tokenizer=$TOK
done
for kind in moe dense; do
  $PY -m experiments.eval_curve --workdir=$W/$kind --tasks=jcommonsenseqa,jmmlu --scoring=loglik --limit=100 \
      --shots=0 --bootstrap=1000
done
