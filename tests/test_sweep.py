"""The sweep launcher: spaces, names and typo checks; the job scripts' text; and a real tiny local sweep that
writes results and plots, resumes an interrupted run and skips finished ones on a re-run."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

from experiments.configs import default
from jpllm_jax.sweep import executors, space
from jpllm_jax.tokenizer import mistral_v1_path

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/default.py"


# ---------------------------------------------------------------------------------------------- spaces
def test_grid_is_cartesian_and_named_from_its_overrides():
  runs = space.plan(default.get_config(), grid="optim.eps=1e-8,1e-5;optim.lr=1e-3,3e-3", seeds=2)
  assert [r.name for r in runs[:3]] == ["eps=1e-8_lr=1e-3_seed=0", "eps=1e-8_lr=1e-3_seed=1",
                                        "eps=1e-8_lr=3e-3_seed=0"]
  assert len(runs) == 8 and len({r.name for r in runs}) == 8
  assert runs[-1].overrides == {"optim.eps": "1e-5", "optim.lr": "3e-3", "seed": "1"}
  # Two fields with the same last part keep their full names.
  assert space.run_name({"train.steps": "3", "other.steps": "4"}) == "train.steps=3_other.steps=4"
  assert space.plan(default.get_config())[0].name == "base"


def test_random_space_is_seeded_and_in_bounds():
  spec = "optim.lr=log(1e-4,1e-2);train.batch_size=choice(8,16);train.steps=int(3,5);optim.b1=uniform(0.8,0.9)"
  runs = space.plan(default.get_config(), space=spec, n_random=40, seed=3)
  assert runs == space.plan(default.get_config(), space=spec, n_random=40, seed=3)
  assert runs != space.plan(default.get_config(), space=spec, n_random=40, seed=4)
  lrs = [float(r.overrides["optim.lr"]) for r in runs]
  assert all(1e-4 <= x <= 1e-2 for x in lrs) and min(lrs) < 1e-3 < max(lrs)  # log-uniform: both decades hit.
  assert {r.overrides["train.batch_size"] for r in runs} == {"8", "16"}
  assert {r.overrides["train.steps"] for r in runs} == {"3", "4", "5"}
  assert all(0.8 <= float(r.overrides["optim.b1"]) <= 0.9 for r in runs)
  dim = space.parse_space("optim.lr=log(1e-4,1e-2)")[0]
  assert dim.sample(random.Random(0)) == f"{float(dim.sample(random.Random(0))):.4g}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid="optim.esp=1e-8,1e-5"), r"^unknown field optim\.esp; did you mean optim\.eps\?$"),
    (dict(grid="optm.lr=1e-3"), r"^unknown field optm\.lr; did you mean optim\?$"),
    (dict(common={"train.stpes": "3"}), r"^unknown field train\.stpes; did you mean train\.steps\?$"),
    (dict(grid="train.steps=1.5"), r"^field train\.steps is int, got '1\.5'$"),
    (dict(grid="optim=1"), r"^field optim is a section"),
    (dict(grid="optim.lr=log(1e-4,1e-2)"), r"--grid takes value lists"),
    (dict(space="optim.lr=log(0,1)", n_random=2), r"needs 0 < lo <= hi"),
    (dict(space="optim.lr=normal(0,1)", n_random=2), r"unknown distribution normal"),
    (dict(space="optim.lr=log(1e-4,1e-2)"), r"needs --random=N"),
    (dict(grid="seed=1,2", seeds=2), r"--seeds sets the field seed"),
    (dict(grid="optim.lr=1e-3", common={"optim.lr": "1e-3"}), r"both swept and set"),
])
def test_space_errors_are_one_line(kwargs, message):
  with pytest.raises(space.SweepError, match=message):
    space.plan(default.get_config(), **kwargs)


# --------------------------------------------------------------------------------------------- scripts
def _launches(tmp_path):
  runs = space.plan(default.get_config(), grid="optim.lr=1e-3,3e-3;optim.eps=1e-8")
  return executors.make_launches(runs, config_path=CONFIG, workdir=tmp_path, common={"train.steps": "100"},
                                 steps=lambda run: 100)


def test_slurm_array_script(tmp_path):
  text = executors.slurm_script(_launches(tmp_path), repo="/repo", path=str(tmp_path / "s.sh"), nodes="2",
                                queue="gpu", gpus_per_node=8, options=["--account=lab"])
  lines = text.splitlines()
  assert lines[0] == "#!/bin/bash"
  for directive in ("--array=0-1", "--nodes=2", "--partition=gpu", "--gpus-per-node=8", "--account=lab",
                    "--time=01:00:00"):
    assert f"#SBATCH {directive}" in lines
  assert 'case "${SLURM_ARRAY_TASK_ID}" in' in lines and "cd /repo" in lines
  run1 = next(line for line in lines if line.startswith("  1) "))
  d = tmp_path / "lr=3e-3_eps=1e-8"
  assert run1 == (f"  1) mkdir -p {d} && srun python -m experiments.train --config={CONFIG} --workdir={d} "
                  f"--config.train.steps=100 --config.optim.lr=3e-3 --config.optim.eps=1e-8 --coordinator=auto "
                  f">> {d}/train.log 2>&1 ;;")
  assert "--coordinator" not in executors.slurm_script(_launches(tmp_path), repo="/r", path="s.sh")


def test_pjsub_bulk_script(tmp_path):
  text = executors.pjsub_script(_launches(tmp_path), repo="/repo", path="p.sh", nodes="2x3x2", queue="large",
                                time_limit="02:00:00", options=["-x PJM_LLIO_GFSCACHE=/vol0004"])
  lines = text.splitlines()
  for directive in ("--bulk --sparam 0-1", '-L "node=2x3x2"', '-L "rscgrp=large"', '-L "elapse=02:00:00"',
                    "-x PJM_LLIO_GFSCACHE=/vol0004"):
    assert f"#PJM {directive}" in lines
  assert 'case "${PJM_BULKNUM}" in' in lines
  assert sum(line.startswith(("  0) ", "  1) ")) for line in lines) == 2
  assert "--config.optim.lr=1e-3" in next(line for line in lines if line.startswith("  0) "))


def test_tpu_vm_script_one_command_per_run(tmp_path):
  text = executors.tpu_vm_script(_launches(tmp_path), repo="~/jpllm-jax", path="t.sh", tpu="v4-32", zone="us-c2-b")
  commands = [line for line in text.splitlines() if line.startswith("gcloud ")]
  assert len(commands) == 2
  head = "gcloud compute tpus tpu-vm ssh v4-32 --zone=us-c2-b --worker=all --command="
  assert all(c.startswith(head) for c in commands)
  assert "--config.optim.lr=3e-3 --config.optim.eps=1e-8 --coordinator=auto" in commands[1]
  # Runs with --dry_run: the script is printed and nothing is written.
  out = _sweep(tmp_path / "sw", "--grid=optim.lr=1e-3,3e-3", "--executor=tpu_vm", "--dry_run")
  assert out.stdout.count("gcloud compute tpus tpu-vm ssh TPU_NAME") == 2 and not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------------ a real tiny sweep
TINY = ";".join([f"data.tokenizer={mistral_v1_path()}", "data.seq_len=32", "model.d_model=32", "model.n_layers=1",
                 "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64", "train.steps=4", "train.batch_size=2",
                 "train.log_every=1", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
                 "optim.warmup_steps=1"])


def _sweep(workdir, *args, check=True):
  proc = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={CONFIG}", f"--workdir={workdir}",
                         *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                        env={**os.environ, "JPLLM_NO_HUGE_PAGES": "1", "JAX_PLATFORMS": "cpu"})
  if check:
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def _steps(run_dir):
  return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_local_sweep_resumes_then_skips(tmp_path):
  grid = "--grid=optim.lr=1e-3,3e-3"
  bad = _sweep(tmp_path, grid, "--set=optim.esp=1e-5", check=False)  # a typo: nothing is launched or written.
  assert bad.returncode != 0 and "unknown field optim.esp; did you mean optim.eps?" in bad.stderr
  assert not tmp_path.joinpath("lr=1e-3").exists()

  first = _sweep(tmp_path, grid, f"--set={TINY};train.stop_after=2", "--parallel=2")  # both cut at step 2.
  assert first.stdout.count("stopped at step 2") == 2, first.stdout
  names = ["lr=1e-3", "lr=3e-3"]
  assert all(_steps(tmp_path / n) == [1, 2] for n in names)

  second = _sweep(tmp_path, grid, f"--set={TINY}", "--parallel=2")  # resumed from the step-2 checkpoints.
  for n in names:
    assert "resumed from step 2" in (tmp_path / n / "train.log").read_text()
    assert _steps(tmp_path / n) == [1, 2, 3, 4]
    assert f"{n}: done in" in second.stdout
  with open(tmp_path / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == names and [r["optim.lr"] for r in rows] == ["1e-3", "3e-3"]
  for r, n in zip(rows, names):
    val = [json.loads(line).get("val_loss") for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    val = [v for v in val if v is not None]
    assert len(val) == 2 and float(r["final_val_loss"]) == pytest.approx(val[-1], rel=1e-3)
    assert float(r["best_val_loss"]) == pytest.approx(min(val), rel=1e-3)
    assert r["status"] == "done" and r["steps"] == "4" and r["tokens_seen"] == str(4 * 2 * 32)
    assert float(r["wall_s"]) > 0 and float(r["step_time_s"]) > 0
  summary = (tmp_path / "summary.md").read_text()
  assert "2 runs, 2 done." in summary and "| lr=1e-3 |" in summary and "## optim.lr" in summary
  for png in ("loss_curves.png", "final_loss_vs_optim.lr.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  before = {n: (tmp_path / n / "metrics.jsonl").read_text() for n in names}
  third = _sweep(tmp_path, grid, f"--set={TINY}")
  assert third.stdout.count("finished before, skipped") == 2, third.stdout
  assert {n: (tmp_path / n / "metrics.jsonl").read_text() for n in names} == before


# --------------------------------------------------------------------------------------------- studies
def test_study_configs_load_and_the_dense_twin_matches_the_moe_active_parameters():
  from experiments.studies import adam_eps, cpt, dense_vs_moe
  from jpllm_jax.models import config as model_config
  from jpllm_jax.train import config as run_config
  from jpllm_jax.train import flops
  for c in [adam_eps.get_config(), *(cpt.get_config(arm) for arm in cpt.ARMS)]:
    run_config.with_defaults(c)
  assert space.plan(adam_eps.get_config(), grid="optim.eps=1e-8,1e-5", seeds=3)[-1].name == "eps=1e-5_seed=2"
  active = {}
  for kind in ("dense", "moe"):
    model = run_config.with_defaults(dense_vs_moe.get_config(kind)).model.to_dict()
    active[kind] = flops.matmul_params(model_config.ModelConfig.from_dict({**model, "vocab_size": 8064}))
  assert active["dense"] == active["moe"] == 2_990_080


def test_seed_spread_groups_seeds_and_tests_the_difference(tmp_path):
  for point, base in (("eps=1e-8", 7.0), ("eps=1e-5", 6.0)):
    for seed, jitter in enumerate((0.0, 0.1, -0.1)):
      run = tmp_path / f"{point}_seed={seed}"
      run.mkdir()
      run.joinpath("metrics.jsonl").write_text("".join(
          json.dumps({"step": s, "loss": 9.0, "val_loss": base + jitter + 10 / s}) + "\n" for s in (10, 20)))
  (tmp_path / "base").mkdir()  # not a seeded run: ignored.
  out = subprocess.run([sys.executable, "-m", "experiments.studies.seed_spread", f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  text = (tmp_path / "seed_spread.md").read_text()
  assert "| eps=1e-8 | 8.0000 ± 0.1000 | 7.5000 ± 0.1000 |" in text
  row = next(line for line in text.splitlines() if line.startswith("| eps=1e-5 | eps=1e-8 |"))  # sorted names.
  assert row.split(" | ")[2] == "-1.0000" and float(row.split(" | ")[-1].rstrip(" |")) < 0.01
  assert (tmp_path / "seed_spread.png").stat().st_size > 0
