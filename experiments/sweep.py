r"""Launches a hyperparameter sweep: one `experiments.train` run per point, each in `<workdir>/<name>`.

  python -m experiments.sweep --config=experiments/configs/default.py --workdir=/tmp/sweep \
      --grid='optim.eps=1e-8,1e-5;optim.lr=1e-3,3e-3' --set='train.steps=100' [--seeds=3] [--parallel=2]
  python -m experiments.sweep --workdir=/tmp/rs --random=8 --space='optim.lr=log(1e-4,1e-2)' --seed=0
  python -m experiments.sweep ... --executor=slurm|pjsub|tpu_vm [--dry_run]

Space syntax (fields separated by `;`): values `a,b,c`, `log(lo,hi)`, `uniform(lo,hi)`, `int(lo,hi)`,
`choice(a,b)`; `--grid` takes values (cartesian product), `--space` any (sampled `--random` times with
`--seed`); `--seeds=K` repeats each point with config field `seed` = seed + 0..K-1. Every field is checked
against the config before anything runs. Re-running skips finished runs and resumes unfinished ones from their
checkpoints. `local` runs each point as its own process (`--parallel` at a time); `slurm`, `pjsub` and
`tpu_vm` write a job script to `<workdir>/sweep_<executor>.sh` for you to submit (a later local re-run skips
what the jobs finished and collects the results). `--dry_run` prints the commands or the script, writes
nothing. Results: `<workdir>/results.csv`, `summary.md`, `loss_curves.png`, `final_loss_vs_<field>.png`.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

from absl import app, flags

from jpllm_jax import sweep
from jpllm_jax.sweep import executors, results, space

REPO = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_string("config", "experiments/configs/default.py", "Training config file (get_config()).")
flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per run, results and plots.", required=True)
flags.DEFINE_string("grid", "", "Cartesian grid: 'optim.eps=1e-8,1e-5;optim.lr=1e-3,3e-3'.")
flags.DEFINE_integer("random", 0, "Number of random samples of --space.")
flags.DEFINE_string("space", "", "Random-search space: 'optim.lr=log(1e-4,1e-2);train.batch_size=choice(8,16)'.")
flags.DEFINE_integer("seed", 0, "Seed of the random search's sampler.")
flags.DEFINE_string("set", "", "Overrides common to every run: 'train.steps=100;data.seq_len=128'.")
flags.DEFINE_integer("seeds", 1, "Repeats of each point with config seed = seed + 0..K-1 (named seed=<s>).")
flags.DEFINE_enum("executor", "local", executors.EXECUTORS, "Run here, or write a Slurm/pjsub/TPU-VM job script.")
flags.DEFINE_integer("parallel", 1, "local: runs at a time.")
flags.DEFINE_bool("dry_run", False, "Print the commands (or the job script) and exit; nothing is written.")
flags.DEFINE_list("train_flags", [], "Extra flags for every experiments.train command (e.g. --verbose).")
flags.DEFINE_string("repo_dir", str(REPO), "Job scripts: the repository on the cluster or TPU VM.")
flags.DEFINE_string("job_name", "sweep", "Job scripts: the job name.")
flags.DEFINE_string("nodes", "1", "slurm: nodes per run; pjsub: the node shape ('1', '2x3x2').")
flags.DEFINE_string("time", "01:00:00", "slurm: --time; pjsub: elapse.")
flags.DEFINE_string("queue", None, "slurm: the partition (default: none); pjsub: the resource group (small).")
flags.DEFINE_integer("gpus_per_node", 0, "slurm: --gpus-per-node (0: not set).")
flags.DEFINE_multi_string("job_option", [], "Job scripts: extra directive lines ('--account=X', '-x VAR=1').")
flags.DEFINE_string("tpu_name", "TPU_NAME", "tpu_vm: the TPU VM's name.")
flags.DEFINE_string("tpu_zone", "ZONE", "tpu_vm: its zone.")
flags.DEFINE_string("tpu_project", "", "tpu_vm: the Google Cloud project (default: gcloud's).")
FLAGS = flags.FLAGS


def load_config(path: str):
  """`get_config()` of a config file."""
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config_arg(path: pathlib.Path) -> str:
  """The config path as the commands (run from the repository root) name it."""
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_script(launches, workdir: pathlib.Path) -> tuple[pathlib.Path, str]:
  path = workdir / f"sweep_{FLAGS.executor}.sh"
  common = dict(repo=FLAGS.repo_dir, path=str(path))
  if FLAGS.executor == "slurm":
    text = executors.slurm_script(launches, **common, job_name=FLAGS.job_name, nodes=FLAGS.nodes,
                                  time_limit=FLAGS.time, queue=FLAGS.queue or "", gpus_per_node=FLAGS.gpus_per_node,
                                  options=FLAGS.job_option)
  elif FLAGS.executor == "pjsub":
    text = executors.pjsub_script(launches, **common, job_name=FLAGS.job_name, nodes=FLAGS.nodes,
                                  time_limit=FLAGS.time, queue=FLAGS.queue or "small", options=FLAGS.job_option)
  else:
    text = executors.tpu_vm_script(launches, **common, tpu=FLAGS.tpu_name, zone=FLAGS.tpu_zone,
                                   project=FLAGS.tpu_project)
  return path, text


def main(argv):
  del argv
  config_path = pathlib.Path(FLAGS.config).resolve()
  if not config_path.exists():
    sys.exit(f"error: config {FLAGS.config} does not exist")
  config = load_config(str(config_path))
  workdir = pathlib.Path(FLAGS.workdir).absolute()
  try:
    common = sweep.parse_set(FLAGS.set)
    runs = sweep.plan(config, grid=FLAGS.grid, space=FLAGS.space, n_random=FLAGS.random, seed=FLAGS.seed,
                      seeds=FLAGS.seeds, common=common)
  except space.SweepError as e:
    sys.exit(f"error: {e}")

  def steps(run):
    text = run.overrides.get("train.steps", common.get("train.steps"))
    return int(text) if text else int(config.train.steps)

  launches = sweep.make_launches(runs, config_path=_config_arg(config_path), workdir=workdir, common=common,
                                 steps=steps, train_flags=FLAGS.train_flags)
  todo = [la for la in launches if not sweep.is_finished(la)]
  print(f"sweep of {len(launches)} runs in {workdir}: {len(launches) - len(todo)} finished, {len(todo)} to run",
        flush=True)
  if FLAGS.executor != "local":
    path, text = write_script(todo, workdir)
    if FLAGS.dry_run or not todo:
      print(text if todo else "nothing to run", end="")
      return
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    submit = {"slurm": "sbatch", "pjsub": "pjsub", "tpu_vm": "bash"}[FLAGS.executor]
    print(f"wrote {path}; submit it with: {submit} {path}")
    return
  if FLAGS.dry_run:
    for la in launches:
      print(("# finished: " if la not in todo else "") + f"(cd {REPO} && {la.command(sys.executable)})")
    return
  count = iter(range(1, len(launches) + 1))
  outcomes = sweep.run_local(launches, parallel=FLAGS.parallel, env=dict(os.environ), cwd=str(REPO),
                             report=lambda la, o: print(results.progress(next(count), len(launches), la, o),
                                                        flush=True))
  rows = results.write(launches, workdir, common)
  done = sum(r["status"] == "done" for r in rows)
  print(f"{done}/{len(rows)} runs done; results in {workdir / 'results.csv'}, {workdir / 'summary.md'}")
  if any(o["rc"] for o in outcomes.values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
