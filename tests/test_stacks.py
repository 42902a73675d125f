"""models.stacks: the one description of the stacks of layers, against every reader (parameter table, HF table,
the pipeline's stage layout, the MoE statistics rows)."""
import jax
import numpy as np
import pytest

from jpllm_jax import models
from jpllm_jax.hf import mapping
from jpllm_jax.models import presets, stacks
from jpllm_jax.train import step as step_lib


@pytest.mark.parametrize("name", ["llama2-7b", "mixtral-8x7b", "deepseek-v3", "fugaku-llm-13b"])
def test_stacks_cover_every_layer_once_and_match_the_param_table(name):
  cfg = presets.twin(models.preset(name))
  found = stacks.stacks(cfg)
  shapes = models.param_shapes(cfg)
  layers = []
  for s in found:  # each stack's weights are where it says, with its layer count on the leading axis
    assert {w.shape[0] for w in jax.tree.leaves(stacks.get(shapes, s))} == {s.n}
    layers += range(s.first, s.first + s.n)
  assert layers == list(range(cfg.n_layers + cfg.mtp.depth))
  assert sum(s.n for s in stacks.main_stacks(cfg)) == cfg.n_layers
  routed = [s for s in found if s.moe]  # routed rows: consecutive, in stack order, as many as the config counts
  assert [s.routed_row for s in routed] == list(np.cumsum([0] + [s.n for s in routed])[:-1])
  assert sum(s.n for s in routed) == cfg.n_routed_layers
  assert all(("router" in stacks.get(shapes, s)) == s.moe for s in found)


def test_hf_table_numbers_layers_by_the_stacks():
  cfg = presets.twin(models.preset("deepseek-v3"))
  flat = {".".join(k): v.shape for k, v in
          __import__("flax").traverse_util.flatten_dict(models.param_shapes(cfg)).items()}
  table = mapping.tensor_table(cfg, flat)
  layer_rows = set(mapping.BY_FAMILY[cfg.family].table)  # the per-layer rows (not the MTP modules' own tensors)
  for s in stacks.stacks(cfg):  # each of the stack's layers is one HF layer index, filled from its own paths
    for i in range(s.n):
      rows = [t for hf, t in table.items()
              if mapping.layer_index(hf) == s.first + i and t.row in layer_rows and "{i}" in t.row.hf]
      assert rows and all(p.startswith(s.key + ".") for t in rows for p in t.paths), (s.name, i)


def test_stage_layout_follows_the_stacks():
  cfg = presets.twin(models.preset("deepseek-v3"))  # first dense layers, then MoE layers
  S = 2
  layout = step_lib.stage_layout(cfg, S)
  assert [st.name for st, _, _ in layout] == [s.name for s in stacks.main_stacks(cfg)]
  per_chunk = np.zeros(S, int)
  for st, index, active in layout:
    rows = sorted(int(r) for v in range(S) for r in index[v][active[v]])
    assert rows == list(range(st.n))  # every row of the stack on exactly one stage
    per_chunk += active.sum(1)
  assert list(per_chunk) == [cfg.n_layers // S] * S
