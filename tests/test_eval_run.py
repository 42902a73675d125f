"""End to end: a tiny run with in-training evaluation, then experiments.eval and experiments.eval_curve on its
checkpoints write the results JSON, the Markdown table and the plots."""
from __future__ import annotations

import json
import subprocess
import sys

from experiments.configs import default
from jpllm_jax.eval import checkpoint_steps
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train.loop import train

from conftest import REPO, SHARED_DATA


def _tiny_run(workdir):
  c = default.get_config()
  c.data.tokenizer = mistral_v1_path()
  c.data.seq_len = 64
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  c.train.update(steps=4, batch_size=4, log_every=1, eval_every=0, checkpoint_every=2, async_checkpoint=False,
                 peak_tflops=1.0)
  c.optim.warmup_steps = 1
  c.eval.update(every=2, tasks="jcommonsenseqa", scoring="loglik,generative", limit=3, shots=1)
  train(c, str(workdir))


def _run(module, *args):
  cmd = [sys.executable, "-m", module, *args, f"--data_dir={SHARED_DATA / 'eval'}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_eval_and_eval_curve_on_a_tiny_run(tmp_path):
  workdir = tmp_path / "run"
  _tiny_run(workdir)
  log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evaluated = {r["step"]: r for r in log if "eval/jcommonsenseqa/loglik" in r}
  assert sorted(evaluated) == [2, 4]  # every 2 steps, beside the loss
  assert all(0 <= r["eval/avg"] <= 1 and "loss" in r for r in evaluated.values())

  out = tmp_path / "results.json"
  stdout = _run("experiments.eval", f"--workdir={workdir}", f"--output={out}", "--limit=2", "--shots=1",
                "--tasks=jcommonsenseqa,jemhopqa,mgsm", "--bootstrap=100")
  results = json.loads(out.read_text())
  assert results["model"]["step"] == 4 and results["model"]["tokenizer"]["pieces"] == 32000
  assert results["harness"].startswith("jpllm-eval") and results["settings"]["shots"] == 1
  assert set(results["scores"]) == {"jcommonsenseqa", "jcommonsenseqa/loglik", "jemhopqa", "mgsm"}
  assert set(results["categories"]) == {"MC", "QA", "MR"} and results["average"]["ci95"] is not None
  assert len(results["predictions"]["jemhopqa"]) == 2 and "prompt" in results["predictions"]["jemhopqa"][0]
  table = out.with_suffix(".md").read_text()
  assert "| jcommonsenseqa/loglik | MC | acc_char | 2 |" in table and "**AVG**" in table and table in stdout + "\n"

  curve_dir = tmp_path / "curve"
  _run("experiments.eval_curve", f"--workdir={workdir}", f"--out_dir={curve_dir}", "--limit=2", "--shots=1",
       "--tasks=jcommonsenseqa,jemhopqa", "--bootstrap=50")
  rows = json.loads((curve_dir / "curve.json").read_text())
  assert [r["step"] for r in rows] == checkpoint_steps(workdir) and rows[-1]["step"] == 4
  assert all(r["loss"] is not None and r["tokens_seen"] == r["step"] * 4 * 64 for r in rows)
  assert {"MC", "QA", "AVG", "jcommonsenseqa/loglik"} <= set(rows[0])
  for png in ("score_vs_loss.png", "score_vs_tokens.png"):
    assert (curve_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert all((curve_dir / f"step_{r['step']}.json").exists() for r in rows)


def test_eval_of_an_imported_hugging_face_directory(tmp_path):
  import shutil

  import hf_helpers
  config = hf_helpers.hf_config("llama2")
  config.vocab_size = 32000
  hf_helpers.transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
  shutil.copy(mistral_v1_path(), tmp_path / "hf" / "tokenizer.model")
  out = tmp_path / "hf.json"
  _run("experiments.eval", f"--hf_dir={tmp_path / 'hf'}", f"--output={out}", "--limit=3", "--shots=2",
       "--tasks=jmmlu", "--scoring=loglik", "--loglik_norm=token")
  results = json.loads(out.read_text())
  assert results["model"]["source"] == "hf" and results["model"]["step"] is None
  assert list(results["scores"]) == ["jmmlu/loglik"] and results["scores"]["jmmlu/loglik"]["metric"] == "acc_token"
  assert results["average"] is None and "AVG" not in out.with_suffix(".md").read_text()


def test_bad_task_scoring_and_workdir_fail_in_one_line_before_loading(tmp_path):
  out = tmp_path / "results.json"
  cases = {"--tasks=jcommonsenseqa,jnli": "--tasks: unknown tasks ['jnli']",
           "--scoring=loglik,bogus": "--scoring: unknown ['bogus']",
           "--limit=1": "holds no checkpoints"}
  for flag, message in cases.items():
    cmd = [sys.executable, "-m", "experiments.eval", f"--workdir={tmp_path / 'missing'}", f"--output={out}", flag]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()
