"""The collective cost model against brute force: BFS hop counts, hop-by-hop walked routes, closed forms."""
import collections
import os
import itertools
import math

import numpy as np
import pytest

from jpllm_jax.parallel import topology as T


def net_of(*axes, injection_bw=None):
  axes = tuple(T.Axis(f"a{i}", n, kind, 1e9 * (i + 1), 1e-6 * (i + 1)) for i, (n, kind) in enumerate(axes))
  return T.Network("test", axes, tuple(a.name for a in reversed(axes)), injection_bw)


TORUS_423 = net_of((4, T.RING), (2, T.RING), (3, T.RING))
MIXED = net_of((4, T.RING), (3, T.LINE), (2, T.SWITCH))


def bfs_hops(net, start):
  """Hop counts from `start` over an explicit graph (a switch axis is an extra vertex: one hop up, one down)."""
  def neighbours(v):
    if v[0] == "switch":
      _, k, line = v
      return [line[:k] + (i,) + line[k + 1:] for i in range(net.axes[k].size)]
    out = []
    for k, ax in enumerate(net.axes):
      if ax.kind == T.SWITCH:
        out.append(("switch", k, v[:k] + (0,) + v[k + 1:]))
        continue
      for c in (v[k] + 1, v[k] - 1):
        c = c % ax.size if ax.kind == T.RING else c
        if 0 <= c < ax.size and c != v[k]:
          out.append(v[:k] + (c,) + v[k + 1:])
    return out

  dist, frontier = {start: 0}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in neighbours(v):
        if w not in dist:
          dist[w] = dist[v] + 1
          nxt.append(w)
    frontier = nxt
  return {v: d for v, d in dist.items() if v[0] != "switch"}


def walk(net, src, dst):
  """Links of the dimension-order route, one explicit hop at a time (shorter way round, ties positive)."""
  cur, tgt, links = list(net.coords(src)), list(net.coords(dst)), []
  link = lambda k, direction: (int(np.ravel_multi_index(cur, net.shape)) * len(net.axes) + k) * 2 + direction
  for k, ax in enumerate(net.axes):
    if cur[k] == tgt[k]:
      continue
    if ax.kind == T.SWITCH:
      links.append(link(k, 0))
      cur[k] = tgt[k]
      links.append(link(k, 1))
      continue
    fwd = (tgt[k] - cur[k]) % ax.size
    step = 1 if (ax.kind == T.RING and fwd <= ax.size - fwd) or (ax.kind == T.LINE and tgt[k] > cur[k]) else -1
    while cur[k] != tgt[k]:
      links.append(link(k, 0 if step > 0 else 1))
      cur[k] = (cur[k] + step) % ax.size
  return links


@pytest.mark.parametrize("net", [TORUS_423, MIXED], ids=["torus4x2x3", "ring-line-switch"])
def test_routes_are_shortest_and_match_a_hop_by_hop_walk(net):
  pairs = np.array(list(itertools.product(range(net.size), repeat=2)))
  msg, link, latency = T.route_links(net, pairs[:, 0], pairs[:, 1])
  hops = np.bincount(msg, minlength=len(pairs))
  for i, (s, d) in enumerate(pairs):
    walked = walk(net, s, d)
    assert sorted(link[msg == i]) == sorted(walked)
    assert hops[i] == bfs_hops(net, tuple(net.coords(s)))[tuple(net.coords(d))]
  assert latency.max() > 0


@pytest.mark.parametrize("n,kind", [(n, T.RING) for n in range(2, 9)] + [(n, T.LINE) for n in range(2, 7)]
                         + [(5, T.SWITCH)])
def test_all_to_all_busiest_link_matches_closed_form_and_enumeration(n, kind):
  net = net_of((n, kind))
  cost = T.all_to_all(net, np.arange(n)[None], nbytes=n * 100.0)
  counts = collections.Counter(l for s, d in itertools.permutations(range(n), 2) for l in walk(net, s, d))
  assert cost.max_link_bytes == pytest.approx(max(counts.values()) * 100.0)
  assert cost.max_link_bytes == pytest.approx(T.all_to_all_link_bytes(net.axes[0], 100.0))
  assert cost.max_hops == max(len(walk(net, s, d)) for s in range(n) for d in range(n)) == T.max_hops(net.axes[0])


@pytest.mark.parametrize("net", [TORUS_423, MIXED, net_of((5, T.RING), (3, T.LINE))],
                         ids=["torus4x2x3", "ring-line-switch", "ring5-line3"])
def test_concurrent_ring_allreduce_along_each_axis_matches_closed_form(net):
  nodes = np.arange(net.size).reshape(net.shape)
  for k, ax in enumerate(net.axes):
    rings = np.moveaxis(nodes, k, -1).reshape(-1, ax.size)
    cost = T.ring_allreduce(net, rings, 1e6)
    assert cost.seconds == pytest.approx(T.ring_allreduce_seconds(ax, 1e6))
    assert cost.steps == 2 * (ax.size - 1)


def test_injection_bandwidth_bounds_a_step():
  net = net_of((4, T.RING), (3, T.RING), injection_bw=1e9)  # links of 1 and 2 GB/s.
  cost = T.step_cost(net, [0, 0, 0, 0], [1, 3, 4, 8], 1e6)  # the busiest link carries 3 of the 4 messages.
  assert cost.max_link_bytes == 3e6 and cost.max_hops == 3
  assert cost.seconds == pytest.approx(4e6 / 1e9 + 2 * 1e-6 + 2e-6)  # injection-bound; node 8 is 2 + 1 hops.


def test_tree_allreduce_steps_and_whole_vector_per_step():
  net = net_of((8, T.LINE))
  cost = T.tree_allreduce(net, np.arange(8)[None], 1e6)
  assert cost.steps == 2 * 3 and cost.max_link_bytes == 1e6 and cost.max_hops == 4
  link_s, lat = [1e6 / 1e9] * 3, [1e-6, 2e-6, 4e-6]
  assert cost.seconds == pytest.approx(2 * (sum(link_s) + sum(lat)))


def small_fugaku():
  return T.tofu_d((4, 2, 4, 2, 3, 2), wrap=(True, False, True))


def test_mapper_puts_tensor_on_the_node_group_and_data_on_the_rings():
  net, layout = small_fugaku(), T.parse_layout("tp6,pp8,dp8")
  placement = T.map_axes(net, layout)
  assert sorted(placement.nodes.ravel()) == list(range(net.size))
  assert placement.pieces["tp"] == (("c", 2), ("b", 3))
  assert placement.pieces["dp"] == (("Z", 2), ("X", 4))
  tp = net.coords(T.groups(placement, "tp"))
  assert (tp[:, :, :4] == tp[:, :1, :4]).all()  # X, Y, Z, a equal inside every tensor group.
  for j, (phys, count) in enumerate(placement.pieces["dp"]):
    c = net.coords(T.groups(placement, "dp", j))
    k = "XYZabc".index(phys)
    assert (np.delete(c, k, -1) == np.delete(c[:, :1], k, -1)).all() and c.shape[1] == count


def test_mapped_allreduce_beats_the_naive_ring_and_the_rank_file_round_trips(tmp_path):
  net, layout = small_fugaku(), T.parse_layout("tp6,pp8,dp8")
  naive, mapped = T.naive_placement(net, layout), T.map_axes(net, layout)
  naive_s = T.ring_allreduce(net, T.groups(naive, "dp"), 1e8).seconds
  mapped_s = T.torus_allreduce(net, mapped, "dp", 1e8).seconds
  assert mapped_s < naive_s
  path = tmp_path / "ranks.txt"
  T.write_rank_file(path, net, mapped)
  np.testing.assert_array_equal(T.read_rank_file(path, net), mapped.nodes.ravel())
  assert len(path.read_text().splitlines()) == net.size + 1


def test_layout_errors_name_the_problem():
  with pytest.raises(ValueError, match="tp<N>"):
    T.parse_layout("tp6,xx2")
  with pytest.raises(ValueError, match="has 48 ranks"):
    T.map_axes(small_fugaku(), T.parse_layout("tp6,pp8"))
  assert math.prod(T.parse_layout("tp6,pp8,dp288").values()) == 13824


def test_one_process_per_cmg_puts_tensor_inside_the_node_and_the_3d_fold_keeps_neighbours(tmp_path):
  net = T.tofu_d_cmg((4, 2, 4, 2, 3, 2))
  placement = T.map_axes(net, T.parse_layout("tp6,pp8,dp32"))
  assert placement.pieces["tp"] == (("cmg", 2), ("b", 3)) and placement.pieces["pp"][0] == ("cmg", 2)
  assert T.node_shape_3d(net) == (8, 6, 8)
  nodes = np.arange(net.size // 4)
  folded = T.fold_3d(T.tofu_d((4, 2, 4, 2, 3, 2)), nodes)
  assert len({tuple(c) for c in folded.tolist()}) == len(nodes)  # a bijection onto the 8x6x8 box.
  phys = T.tofu_d((4, 2, 4, 2, 3, 2))
  by_coord = {tuple(c): n for n, c in zip(nodes, folded.tolist())}
  for c, n in by_coord.items():  # logical neighbours along x are one physical hop apart (X or a).
    m = by_coord.get((c[0] + 1, c[1], c[2]))
    if m is not None:
      assert np.abs(phys.coords(n) - phys.coords(m)).sum() == 1
  path = tmp_path / "rankmap"
  T.write_fujitsu_rank_map(path, net, placement)
  lines = path.read_text().splitlines()
  assert len(lines) == net.size
  want = T.fold_3d(phys, placement.nodes.ravel() // 4)
  assert lines[:3] == ["(" + ",".join(map(str, c)) + ")" for c in want[:3].tolist()]


def test_fugaku_launch_rendezvous_and_job_writer(tmp_path):
  import json, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  from experiments.fugaku import launch  # pylint: disable=import-outside-toplevel
  env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
         "JPLLM_RENDEZVOUS": str(tmp_path / "rdv")}
  argv = launch.train_argv(env, ["--workdir=W"])
  addr = (tmp_path / "rdv" / "coordinator").read_text().strip()
  assert argv[-4:] == [f"--coordinator={addr}", "--num_processes=4", "--process_id=0", "--workdir=W"]
  other = launch.train_argv({**env, "OMPI_COMM_WORLD_RANK": "3"}, [])
  assert other[-3:] == [f"--coordinator={addr}", "--num_processes=4", "--process_id=3"]
  with pytest.raises(TimeoutError):
    launch.coordinator(1, str(tmp_path / "empty"), timeout_s=0.1)
  with pytest.raises(RuntimeError, match="mpiexec"):
    launch.rank_and_size({})
  # The job writer: Fugaku-LLM 13B's layout fits one process per node (32 GiB) and is written; the same layout
  # at four processes per node (one per CMG, 3,456 nodes) is refused by the memory model.
  out = tmp_path / "job"
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.fugaku.job", f"--out={out}", *a], cwd=REPO,
                                  capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  ok = run()
  assert ok.returncode == 0, ok.stderr[-2000:]
  summary = json.loads(ok.stdout.strip().splitlines()[-1])
  assert summary["memory"]["fits"] and summary["nodes"] == 13824 and summary["threads_per_process"] == 48
  job = (out / "job.sh").read_text()
  assert '#PJM -L "node=48x6x48"' in job and '--mpi "proc=13824"' in job and "@" not in job.replace(
      "%/1000r", "")
  assert len((out / "rankmap").read_text().splitlines()) == 13824
  from experiments.fugaku import job  # pylint: disable=import-outside-toplevel
  per_cmg = job.memory_check(job.load_config(str(REPO / "experiments/fugaku/fugaku_llm_13b.py")), 4, 32.0)
  assert not per_cmg["fits"] and per_cmg["per_node_gib"] == pytest.approx(4 * summary["memory"]["per_node_gib"],
                                                                          abs=0.05)
