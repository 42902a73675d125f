r"""Study 3: evaluation score against training loss over checkpoints, a small dense model against a small MoE
with the same active parameters. The kind after the colon; run_dense_vs_moe.sh runs both and their curves.

  W=/tmp/studies/dense_vs_moe
  python -m experiments.train --config=experiments/studies/dense_vs_moe.py:moe --workdir=$W/moe \
      --config.data.tokenizer=/tmp/studies/tok_ja8k/tokenizer.model
  python -m experiments.train --config=experiments/studies/dense_vs_moe.py:dense --workdir=$W/dense \
      --config.data.tokenizer=/tmp/studies/tok_ja8k/tokenizer.model
  python -m experiments.eval_curve --workdir=$W/moe --tasks=jcommonsenseqa,jmmlu --scoring=loglik \
      --limit=100 --shots=0 --bootstrap=1000     # and the same for $W/dense

- moe: experiments/configs/moe_tiny.py's DeepSeek-V3-style model (d_model 128, 3 layers, MLA, 64 routed experts
  of d_ff 64 top-6 + 1 shared, the first layer dense with d_ff 384, one MTP module).
- dense: the same model without experts, every layer a dense SwiGLU of d_ff 448, which gives exactly the MoE's
  active matmul parameters (2,990,080 with the 8k tokenizer's padded 8,064-row head; train/flops.py
  `matmul_params`), so both cost the same FLOPs per token. The MoE holds 7.5x the feed-forward parameters.
Both: 120 steps of 8 x 128 tokens, lr 3e-3 peak with 10 warm-up steps, a checkpoint every 20 steps (all kept)
for eval_curve; the shared 8k Japanese tokenizer (experiments/studies/adam_eps.py says how it is made).
"""
from __future__ import annotations

from experiments.configs import moe_tiny

_MOE_ONLY = ("n_experts", "n_experts_per_tok", "moe_d_ff", "n_shared_experts", "first_k_dense", "router", "n_group",
             "topk_group", "norm_topk_prob", "routed_scaling_factor", "moe_aux_loss_coef")


def get_config(kind: str = "moe"):
  if kind not in ("dense", "moe"):
    raise ValueError(f"kind must be dense or moe, got {kind!r}")
  c = moe_tiny.get_config()
  if kind == "dense":
    model = {k: v for k, v in c.model.to_dict().items() if k not in _MOE_ONLY}
    model["d_ff"] = 448
    c.model = model
  c.data.seq_len = 128
  c.train.update(steps=120, batch_size=8, log_every=10, eval_every=20, eval_batches=4, checkpoint_every=20,
                 keep_checkpoints=10)
  c.optim.update(lr=3e-3, warmup_steps=10)
  return c
