"""How a sweep's runs are launched: each run is `python -m experiments.train` in its own process and
directory, run here (one or N at a time) or written into a job script for Slurm (`sbatch` array), the
Fugaku job scheduler (`pjsub` bulk job) or a TPU VM (`gcloud ... tpu-vm ssh --worker=all` per run).

A run is finished when its `metrics.jsonl` has the step `train.steps`, or when the sweep marked it so after
a successful exit (`sweep_state.json`); a re-launched unfinished run resumes from its latest checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from jpllm_jax.sweep.space import Run

STATE = "sweep_state.json"  # per run: each launch's exit code and wall time, and whether it finished.
LOG = "train.log"  # per run: the training process's stdout and stderr.
EXECUTORS = ("local", "slurm", "pjsub", "tpu_vm")


@dataclasses.dataclass(frozen=True)
class Launch:
  """One run with everything needed to start it."""
  run: Run
  directory: pathlib.Path
  steps: int  # train.steps of this run: a metrics line with this step means finished.
  args: tuple[str, ...]  # the arguments after `python`.

  def command(self, python: str = "python") -> str:
    return shlex.join([python, *self.args])


def make_launches(runs: Sequence[Run], *, config_path: str, workdir: pathlib.Path, common: dict[str, str],
                  steps: Callable[[Run], int], train_flags: Sequence[str] = ()) -> list[Launch]:
  """`python -m experiments.train --config=... --workdir=<workdir>/<name> --config.<k>=<v> ...` per run:
  the common overrides first, then the run's own."""
  out = []
  for run in runs:
    directory = workdir / run.name
    overrides = [f"--config.{k}={v}" for k, v in {**common, **run.overrides}.items()]
    args = ("-m", "experiments.train", f"--config={config_path}", f"--workdir={directory}", *overrides,
            *train_flags)
    out.append(Launch(run, directory, steps(run), args))
  return out


def last_step(directory: pathlib.Path) -> int:
  """The largest step logged in `<directory>/metrics.jsonl` (0 when there is none)."""
  path = directory / "metrics.jsonl"
  step = 0
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        step = max(step, int(json.loads(line)["step"]))
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a killed run.
  return step


def read_state(directory: pathlib.Path) -> dict:
  path = directory / STATE
  return json.loads(path.read_text()) if path.exists() else {"launches": [], "done": False}


def is_finished(launch: Launch) -> bool:
  return read_state(launch.directory)["done"] or last_step(launch.directory) >= launch.steps


def run_one(launch: Launch, env: dict[str, str] | None = None, cwd: str | None = None) -> dict:
  """Runs one launch to its end, output appended to `<run>/train.log`; records the launch in its state."""
  launch.directory.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with open(launch.directory / LOG, "a", encoding="utf-8") as log:
    log.write(f"$ {launch.command(sys.executable)}\n")
    log.flush()
    rc = subprocess.run([sys.executable, *launch.args], stdout=log, stderr=subprocess.STDOUT, env=env,
                        cwd=cwd).returncode
  state = read_state(launch.directory)
  state["launches"].append({"rc": rc, "wall_s": round(time.perf_counter() - start, 3), "time": time.time()})
  state["done"] = rc == 0 and last_step(launch.directory) >= launch.steps  # not after a train.stop_after exit.
  (launch.directory / STATE).write_text(json.dumps(state, indent=1) + "\n")
  return {"rc": rc, "done": state["done"], "wall_s": state["launches"][-1]["wall_s"]}


def run_local(launches: Sequence[Launch], *, parallel: int = 1, env: dict[str, str] | None = None,
              cwd: str | None = None,
              report: Callable[[Launch, dict], None] = lambda launch, outcome: None) -> dict[str, dict]:
  """Runs the unfinished launches, `parallel` at a time (each its own process: a crash stays in its run);
  `report` is called as each one ends (and for each skipped one). Returns the outcome by run name."""
  outcomes, lock = {}, threading.Lock()

  def go(launch: Launch) -> None:
    if is_finished(launch):
      outcome = {"skipped": True, "done": True, "rc": 0}
    else:
      outcome = run_one(launch, env, cwd)
    with lock:
      outcomes[launch.run.name] = outcome
      report(launch, outcome)

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    for future in [pool.submit(go, launch) for launch in launches]:
      future.result()
  return outcomes


def _run_lines(launch: Launch, prefix: str = "", extra: str = "") -> str:
  """The shell line that runs one launch (`prefix` before, `extra` flags after), its output appended to
  `<run>/train.log`."""
  d = shlex.quote(str(launch.directory))
  return f"mkdir -p {d} && {prefix}{launch.command()}{extra} >> {d}/{LOG} 2>&1"


def _header(kind: str, n: int, submit: str) -> list[str]:
  return ["#!/bin/bash", f"# {n} runs of a sweep, written by `python -m experiments.sweep --executor={kind}` "
          "(finished runs left out; run the sweep again to rewrite it).", f"# Submit: {submit}"]


def slurm_script(launches: Sequence[Launch], *, repo: str, path: str, job_name: str = "sweep", nodes: str = "1",
                 time_limit: str = "01:00:00", queue: str = "", gpus_per_node: int = 0,
                 options: Sequence[str] = ()) -> str:
  """One `sbatch` array job: task i runs launch i (a `case` on SLURM_ARRAY_TASK_ID); multi-node runs start
  one process per node with `srun` and find each other with `--coordinator=auto`."""
  lines = _header("slurm", len(launches), f"sbatch {path}")
  lines += [f"#SBATCH --job-name={job_name}", f"#SBATCH --array=0-{len(launches) - 1}", f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={time_limit}",
            f"#SBATCH --output={pathlib.Path(path).parent}/slurm-%A_%a.out"]
  lines += [f"#SBATCH --partition={queue}"] * bool(queue) + [f"#SBATCH --gpus-per-node={gpus_per_node}"] * bool(
      gpus_per_node) + [f"#SBATCH {o}" for o in options]
  multi = " --coordinator=auto" if nodes != "1" else ""
  lines += ["set -euo pipefail", f"cd {shlex.quote(repo)}", 'case "${SLURM_ARRAY_TASK_ID}" in']
  lines += [f"  {i}) {_run_lines(la, 'srun ', multi)} ;;" for i, la in enumerate(launches)]
  lines += ['  *) echo "no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 1 ;;', "esac"]
  return "\n".join(lines) + "\n"


def pjsub_script(launches: Sequence[Launch], *, repo: str, path: str, job_name: str = "sweep", nodes: str = "1",
                 time_limit: str = "01:00:00", queue: str = "small", options: Sequence[str] = ()) -> str:
  """One Fugaku bulk job (`#PJM --bulk --sparam 0-(N-1)`): sub-job ${PJM_BULKNUM} runs launch i. `nodes` is
  the node shape (`1`, `2x3x2`), `queue` the resource group, `time_limit` the elapse limit."""
  lines = _header("pjsub", len(launches), f"pjsub {path}")
  lines += [f"#PJM -N {job_name}", f"#PJM --bulk --sparam 0-{len(launches) - 1}", f'#PJM -L "node={nodes}"',
            f'#PJM -L "rscgrp={queue}"', f'#PJM -L "elapse={time_limit}"', "#PJM -j", "#PJM -S"]
  lines += [f"#PJM {o}" for o in options]
  lines += ["set -euo pipefail", f"cd {shlex.quote(repo)}", 'case "${PJM_BULKNUM}" in']
  lines += [f"  {i}) {_run_lines(la)} ;;" for i, la in enumerate(launches)]
  lines += ['  *) echo "no run for bulk number ${PJM_BULKNUM}" >&2; exit 1 ;;', "esac"]
  return "\n".join(lines) + "\n"


def tpu_vm_script(launches: Sequence[Launch], *, repo: str, path: str, tpu: str = "TPU_NAME",
                  zone: str = "ZONE", project: str = "") -> str:
  """A shell script with one `gcloud compute tpus tpu-vm ssh ... --worker=all --command=...` per run, run
  one after the other: every worker starts the same command (`--coordinator=auto` joins them). The workdir
  must be a path all workers share (a mounted bucket or NFS), and the repository must be at `repo` on each."""
  lines = _header("tpu_vm", len(launches), f"bash {path}") + ["set -euo pipefail"]
  where = f"--zone={zone}" + (f" --project={project}" if project else "")
  for la in launches:
    remote = f"cd {shlex.quote(repo)} && {_run_lines(la, extra=' --coordinator=auto')}"
    lines.append(f"gcloud compute tpus tpu-vm ssh {tpu} {where} --worker=all --command={shlex.quote(remote)}")
  return "\n".join(lines) + "\n"
