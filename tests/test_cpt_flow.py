"""Swallow-style continual pre-training in one command: a tiny random HF Llama -> N Japanese pieces learned and the
embedding grown inside train() -> a few steps -> evaluation from the workdir alone -> an HF export that
transformers loads with our token ids and our logits; a resumed run reuses the workdir's tokenizer."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import cpt_swallow
from jpllm_jax import checkpoint, models
from jpllm_jax import eval as jeval
from jpllm_jax.data.jsonl import iter_texts
from jpllm_jax.data.pipeline import _Tokenize
from jpllm_jax.tokenizer import load_tokenizer, mistral_v1_path
from jpllm_jax.train.loop import train

from conftest import REPO, SHARED_DATA
from fake_devices import run_bounded

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
N_PIECES = 200


def _config(base: str, export: str, steps: int):
  c = cpt_swallow.get_config(base)
  c.expand_vocab = N_PIECES
  c.export_hf = export
  c.data.seq_len = 64
  c.train.update(steps=steps, batch_size=4, log_every=1, eval_every=0, checkpoint_every=steps,
                 async_checkpoint=False)
  c.optim.update(lr=1e-3, warmup_steps=1)
  return c


def _sha(path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cpt")
  base = cpt_swallow.tiny_hf_llama(str(tmp / "base"))
  workdir, export = tmp / "run", tmp / "export"
  last = train(_config(base, str(export), 2), str(workdir))
  return base, workdir, export, last


def test_one_command_expands_trains_and_keeps_the_tokenizer_in_the_workdir(run):
  base, workdir, _, last = run
  kept = workdir / "tokenizer"
  sp = load_tokenizer(str(kept / "tokenizer.model"))
  assert sp.vocab_size() == 32000 + N_PIECES
  base_sp = load_tokenizer(mistral_v1_path())
  assert [sp.id_to_piece(i) for i in range(32000)] == [base_sp.id_to_piece(i) for i in range(32000)]
  assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in kept.iterdir()}
  cfg = checkpoint.load_config(workdir / "checkpoints")
  assert cfg.vocab_size == 32256  # 32,200 pieces padded to a multiple of 128.
  assert np.isfinite(last["loss"]) and last["lr"] > 0
  # Evaluation reads the workdir alone: its tokenizer copy, not the base directory.
  cfg, params, sp, info = jeval.load_model(workdir=str(workdir))
  assert info["tokenizer"]["path"] == str((kept / "tokenizer.model").absolute())
  lm = jeval.LanguageModel(cfg, params, sp, batch_size=4)
  results = jeval.evaluate(lm, jeval.get_tasks("jcommonsenseqa"), data_dir=str(SHARED_DATA / "eval"), shots=1,
                           limit=4, scoring=["loglik"], n_bootstrap=0, keep_predictions=False)
  row = results["scores"]["jcommonsenseqa/loglik"]
  assert row["n"] == 4 and 0.0 <= row["score"] <= 1.0


def test_export_loads_in_transformers_with_our_ids_and_logits(run):
  _, workdir, export, _ = run
  assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in export.iterdir()}
  generation = json.loads((export / "generation_config.json").read_text())
  assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
  tok = transformers.AutoTokenizer.from_pretrained(str(export))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(export), torch_dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  sp = load_tokenizer(str(workdir / "tokenizer" / "tokenizer.model"))
  feed = _Tokenize(sp)
  texts = list(itertools.islice(iter_texts(SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"), 50))
  texts += list(itertools.islice(iter_texts(SHARED_DATA / "text_en" / "pretrain_en.jsonl"), 20))
  new_ids = 0
  for text in texts:
    fed = feed({"text": text}).tolist()
    assert tok(text)["input_ids"] + [sp.eos_id()] == fed, text[:60]  # the pipeline's EOS ends the document.
    new_ids += sum(i >= 32000 for i in fed)
  assert new_ids > 0  # the learned pieces are used on Japanese text.
  cfg, params = checkpoint.load_params(workdir / "checkpoints")
  ids = np.asarray([feed({"text": t}).tolist()[:48] for t in texts[:2]])
  ours = np.asarray(models.forward(cfg, params, jnp.asarray(ids)))
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids)).logits.numpy()
  assert theirs.shape == ours.shape == (2, 48, 32256)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_convert_from_the_workdir_writes_the_same_complete_directory(run, tmp_path):
  _, workdir, export, _ = run
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  proc = run_bounded([sys.executable, "-m", "experiments.convert", f"--ckpt_dir={workdir}",
                      f"--hf_out={tmp_path / 'hf'}"], 300, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(p.name for p in export.iterdir())
  assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == names
  for name in names:  # weights included: the checkpoint holds the params the run exported.
    assert (tmp_path / "hf" / name).read_bytes() == (export / name).read_bytes(), name


def test_resumed_run_reuses_the_workdirs_tokenizer(run):
  base, workdir, export, _ = run
  kept = workdir / "tokenizer" / "tokenizer.model"
  before, mtime = _sha(kept), kept.stat().st_mtime_ns
  last = train(_config(base, str(export), 3), str(workdir))
  assert _sha(kept) == before and kept.stat().st_mtime_ns == mtime  # not learned again.
  assert np.isfinite(last["loss"])
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]  # resumed at step 2, not started again.



def test_expand_vocab_needs_an_hf_model_with_a_tokenizer(tmp_path):
  from jpllm_jax.train.config import ConfigError
  c = cpt_swallow.get_config(str(tmp_path))  # a directory without config.json or tokenizer.model.
  with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
    train(c, str(tmp_path / "run"))
  c.init_from_hf = ""
  with pytest.raises(ConfigError, match="set init_from_hf too"):
    train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before anything was written.
