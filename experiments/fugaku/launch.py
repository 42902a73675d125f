r"""One process of a Fugaku job: finds its rank and the job's coordinator under the job scheduler, then execs
`python -m experiments.train --coordinator=HOST:PORT --num_processes=N --process_id=I ARGS...`.

  mpiexec ... python -m experiments.fugaku.launch --config=experiments/fugaku/fugaku_llm_13b.py --workdir=DIR

Fujitsu MPI (Open MPI based) gives each process OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (PMIX_RANK as a
fallback); pjsub gives PJM_JOBID. Compute nodes have no coordinator service, so rank 0 writes `host:port` into
$JPLLM_RENDEZVOUS/coordinator (a directory on the shared file system, per job) and the others wait for it.
"""
from __future__ import annotations

import os
import socket
import sys
import time

PORT = 8476


def rank_and_size(env) -> tuple[int, int, int]:
  """(rank, size, local rank) from the MPI launcher's variables."""
  rank = env.get("OMPI_COMM_WORLD_RANK", env.get("PMIX_RANK"))
  size = env.get("OMPI_COMM_WORLD_SIZE", env.get("PJM_MPI_PROC"))
  if rank is None or size is None:
    raise RuntimeError("no OMPI_COMM_WORLD_RANK/PMIX_RANK and OMPI_COMM_WORLD_SIZE/PJM_MPI_PROC: not started by mpiexec")
  return int(rank), int(size), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))


def coordinator(rank: int, rendezvous: str, timeout_s: float = 600.0, host: str | None = None) -> str:
  """Rank 0 publishes its host:PORT in `rendezvous`/coordinator (atomically); every rank returns it."""
  path = os.path.join(rendezvous, "coordinator")
  if rank == 0:
    os.makedirs(rendezvous, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
      f.write(f"{host or socket.gethostbyname(socket.gethostname())}:{PORT}\n")
    os.replace(tmp, path)
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"rank {rank}: no {path} after {timeout_s:.0f} s")
    time.sleep(0.5)
  with open(path, encoding="ascii") as f:
    return f.read().strip()


def train_argv(env, args: list[str], timeout_s: float = 600.0) -> list[str]:
  rank, size, _ = rank_and_size(env)
  rendezvous = env.get("JPLLM_RENDEZVOUS") or os.path.join(os.getcwd(), f".rendezvous.{env.get('PJM_JOBID', 'job')}")
  addr = coordinator(rank, rendezvous, timeout_s)
  return [sys.executable, "-m", "experiments.train", f"--coordinator={addr}", f"--num_processes={size}",
          f"--process_id={rank}", *args]


if __name__ == "__main__":
  argv = train_argv(os.environ, sys.argv[1:])
  sys.stdout.flush()
  os.execv(argv[0], argv)
