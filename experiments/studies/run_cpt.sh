#!/bin/bash
# Study 2 end to end (see cpt.py): ./experiments/studies/run_cpt.sh [WORKDIR], from the repository root.
# Each step is skipped when its output is there, so a re-run resumes.
set -euo pipefail
W=${1:-/tmp/studies/cpt}
PY=${PYTHON:-python}
JA=../shared/data/text_ja/pretrain_ja.jsonl
EN=../shared/data/text_en/pretrain_en.jsonl
train() { $PY -m experiments.train --config=experiments/studies/cpt.py:$1 --workdir=$W/$1 "${@:2}"; }
mkdir -p $W
[ -f $W/tok_en/tokenizer.model ] || $PY -m experiments.tokenizer train --model_type=bpe --vocab_size=2000 \
    --input=$EN --output=$W/tok_en
[ -f $W/en_hf/config.json ] || train en --config.data.tokenizer=$W/tok_en/tokenizer.model --config.export_hf=$W/en_hf
for arm in scratch cpt cpt_expand cpt_mix_expand; do
  extra=()
  [ $arm = scratch ] || extra=(--config.init_from_hf=$W/en_hf)
  train $arm "${extra[@]}"
done
$PY -m experiments.studies.char_loss --texts=ja=$JA,en=$EN --max_chars=20000 --out=$W/char_loss \
    --runs=en=$W/en,scratch=$W/scratch,cpt=$W/cpt,cpt_expand=$W/cpt_expand,cpt_mix_expand=$W/cpt_mix_expand
