"""Physical networks, placing mesh axes onto them, and a link-level cost model of collectives.

A `Network` is a product of axes, each a `ring` (torus dimension), a `line` (mesh dimension) or a `switch`
(every member one up-link and one down-link away from a non-blocking switch: NVLink/NVSwitch, a rail of an
InfiniBand fat tree). Messages follow dimension-order routing (axes in the network's order, the shorter way
round a ring, ties going the positive way); a collective is a list of steps, and a step costs
`max(link bytes / link bandwidth, node bytes / injection bandwidth) + the longest route's hop latency`, so rings
that share links contend. `map_axes` places the logical axes tensor, then pipeline, then data onto the network's
axes from the tightest outwards; `naive_placement` is the scheduler's linear rank order.

Numbers (bytes/s per link and direction, seconds per hop); the latencies are assumptions, not measurements:
- Tofu-D (Fugaku): 6.8 GB/s per link, 10 ports (X+-, Y+-, Z+-, a, b+-, c), 6 TNIs so at most 6 x 6.8 GB/s
  injected at once (Ajima et al., "The Tofu Interconnect D", IEEE Cluster 2018); 0.5 us per hop (that paper's
  one-hop put latency is about 0.5 us). The full machine is 24x23x24x2x3x2 (X, Y, Z, a, b, c); X, Y, Z wrap
  only where a job spans the whole axis, a and c are 2-node meshes, b is a 3-ring.
- TPU v5p: 4,800 Gb/s of ICI per chip over 6 links = 100 GB/s per link (Google Cloud's v5p page); an axis
  wraps when its length is a multiple of 4; 1 us per hop.
- GPU nodes: 8 GPUs per NVSwitch island at 450 GB/s per GPU and direction (H100 NVLink 4: 900 GB/s both ways),
  400 Gb/s = 50 GB/s of InfiniBand per GPU on rail-optimised switches; 1 us (NVLink) and 2 us (IB) per hop.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RING, LINE, SWITCH = "ring", "line", "switch"
LOGICAL_ORDER = ("dp", "pp", "tp")  # rank = (dp * PP + pp) * TP + tp: the launcher's order, tensor fastest.


@dataclass(frozen=True)
class Axis:
  name: str
  size: int
  kind: str  # ring | line | switch
  bandwidth: float  # bytes/s per link and direction
  latency: float  # seconds per hop


@dataclass(frozen=True)
class Network:
  name: str
  axes: tuple[Axis, ...]
  tight_order: tuple[str, ...]  # axis names, tightest links first: where tensor parallelism goes.
  injection_bw: float | None = None  # bytes/s one node can send at once over all its links.

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(a.size for a in self.axes)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def coords(self, nodes) -> np.ndarray:
    """(..., D) coordinates of linear node ids (row-major over the axes, the last fastest)."""
    return np.stack(np.unravel_index(np.asarray(nodes), self.shape), -1)


def tofu_d(shape: Sequence[int] = (24, 2, 24, 2, 3, 2), wrap: Sequence[bool] | None = None) -> Network:
  """A Tofu-D job of X x Y x Z node groups of a x b x c = 2 x 3 x 2 nodes (Fugaku-LLM's 13,824 nodes by default).
  By default X, Y, Z wrap where they span Fugaku's whole axis (24, 23, 24)."""
  if len(shape) != 6 or tuple(shape[3:]) != (2, 3, 2):
    raise ValueError(f"a Tofu-D shape is X,Y,Z,2,3,2; got {tuple(shape)}")
  wrap = tuple(wrap) if wrap is not None else tuple(n == full for n, full in zip(shape[:3], (24, 23, 24)))
  kinds = [RING if w else LINE for w in wrap] + [LINE, RING, LINE]
  axes = tuple(Axis(n, s, k, 6.8e9, 0.5e-6) for n, s, k in zip("XYZabc", shape, kinds))
  return Network("fugaku", axes, ("c", "b", "a", "Y", "Z", "X"), injection_bw=6 * 6.8e9)


# A64FX's four CMGs (core memory groups, 12 compute cores and 8 GiB of HBM2 each) joined by the chip's ring bus.
# Its bandwidth is an assumption (far above a Tofu link; the datasheet gives no per-direction figure here).
CMG_BW, CMG_LATENCY = 100e9, 0.1e-6


def tofu_d_cmg(shape: Sequence[int] = (12, 2, 12, 2, 3, 2), cmgs: int = 4,
               wrap: Sequence[bool] | None = None) -> Network:
  """A Tofu-D job run with one process per CMG: the 6D node axes plus a 7th, innermost `cmg` axis of size
  `cmgs`, the tightest of all. A process slot is node * cmgs + cmg."""
  net = tofu_d(shape, wrap)
  cmg = Axis("cmg", cmgs, RING if cmgs >= 3 else LINE, CMG_BW, CMG_LATENCY)
  return Network("fugaku-cmg", net.axes + (cmg,), ("cmg",) + net.tight_order, net.injection_bw)


def tpu_v5p(shape: Sequence[int] = (8, 8, 16)) -> Network:
  """A TPU v5p slice: a 3D mesh whose axes wrap on multiples of 4."""
  axes = tuple(Axis(n, s, RING if s % 4 == 0 else LINE, 4800e9 / 8 / 6, 1e-6) for n, s in zip("xyz", shape))
  return Network("tpu_v5p", axes, ("z", "y", "x"))


def gpu_cluster(nodes: int, gpus_per_node: int = 8) -> Network:
  """GPU nodes with an NVSwitch island each, joined by rail-optimised InfiniBand (one NIC per GPU)."""
  axes = (Axis("node", nodes, SWITCH, 50e9, 2e-6), Axis("gpu", gpus_per_node, SWITCH, 450e9, 1e-6))
  return Network("gpu", axes, ("gpu", "node"))


def parse_layout(text: str) -> dict[str, int]:
  """`"tp6,pp8,dp288"` -> {"tp": 6, "pp": 8, "dp": 288}; axes left out have size 1."""
  sizes = {a: 1 for a in LOGICAL_ORDER}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, digits = part[:2], part[2:]
    if name not in sizes or not digits.isdigit() or int(digits) < 1:
      raise ValueError(f"layout part {part!r} is not tp<N>, pp<N> or dp<N>")
    sizes[name] = int(digits)
  return sizes


@dataclass(frozen=True)
class Placement:
  """`nodes[dp, pp, tp]` is the node of that rank; `pieces[axis]` how each logical axis splits into physical
  sub-axes, innermost first, as (physical axis name or None, count)."""
  nodes: np.ndarray
  pieces: Mapping[str, tuple[tuple[str | None, int], ...]]


def _check_size(net: Network, layout: Mapping[str, int]) -> tuple[int, ...]:
  sizes = tuple(int(layout.get(a, 1)) for a in LOGICAL_ORDER)
  if math.prod(sizes) != net.size:
    raise ValueError(f"layout {dict(zip(LOGICAL_ORDER, sizes))} has {math.prod(sizes)} ranks; "
                     f"the {net.name} network {net.shape} has {net.size} nodes")
  return sizes


def naive_placement(net: Network, layout: Mapping[str, int]) -> Placement:
  """The scheduler's default: rank r on the r-th node in row-major order over the job shape."""
  sizes = _check_size(net, layout)
  return Placement(np.arange(net.size).reshape(sizes), {a: ((None, n),) for a, n in zip(LOGICAL_ORDER, sizes)})


def map_axes(net: Network, layout: Mapping[str, int]) -> Placement:
  """Tensor, then pipeline, then data onto the network's axes from the tightest: each logical axis takes
  contiguous inner blocks of physical axes (the gcd of what it still needs and what the axis has left), so the
  data axis ends on the outer, strided part and along the long rings."""
  sizes = dict(zip(LOGICAL_ORDER, _check_size(net, layout)))
  names = [a.name for a in net.axes]
  left = {n: net.axes[names.index(n)].size for n in net.tight_order}
  stride = dict.fromkeys(net.tight_order, 1)
  pieces, coords = {}, np.zeros(tuple(sizes[a] for a in LOGICAL_ORDER) + (len(names),), np.int64)
  ranks = np.indices(coords.shape[:-1])
  for logical in reversed(LOGICAL_ORDER):
    need, index, parts = sizes[logical], ranks[LOGICAL_ORDER.index(logical)].copy(), []
    for phys in net.tight_order:
      g = math.gcd(need, left[phys])
      if g == 1:
        continue
      coords[..., names.index(phys)] += (index % g) * stride[phys]
      index //= g
      parts.append((phys, g))
      need, left[phys], stride[phys] = need // g, left[phys] // g, stride[phys] * g
    if need != 1:
      raise ValueError(f"cannot place {logical}={sizes[logical]} on the free network axes {left}")
    pieces[logical] = tuple(parts) or ((None, 1),)
  nodes = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), net.shape)
  return Placement(nodes, pieces)


def groups(placement: Placement, axis: str, piece: int | None = None) -> np.ndarray:
  """(groups, members) node ids of the communicators along a logical axis (or one of its pieces)."""
  k = LOGICAL_ORDER.index(axis)
  nodes = np.moveaxis(placement.nodes, k, -1)
  if piece is None:
    return nodes.reshape(-1, nodes.shape[-1])
  counts = [n for _, n in placement.pieces[axis]]
  split = nodes.reshape(nodes.shape[:-1] + tuple(reversed(counts)))  # innermost piece fastest.
  split = np.moveaxis(split, split.ndim - 1 - piece, -1)
  return split.reshape(-1, counts[piece])


# --- routing and the cost of one step ---------------------------------------------------------------------

def route_links(net: Network, src, dst) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Dimension-order routes: (message index, link id) of every hop, and each message's hop latency.
  Link id = (node * D + axis) * 2 + (0 for the + direction or a switch up-link, 1 for - or a down-link)."""
  src, dst = np.asarray(src, np.int64).ravel(), np.asarray(dst, np.int64).ravel()
  cur, target = net.coords(src), net.coords(dst)
  msg, link, latency = [], [], np.zeros(len(src))
  d, ids = len(net.axes), np.arange(len(src))

  def hop(moving, axis, direction):
    msg.append(ids[moving])
    link.append((np.ravel_multi_index(tuple(cur[moving].T), net.shape) * d + axis) * 2 + direction)

  for k, ax in enumerate(net.axes):
    delta = target[:, k] - cur[:, k]
    if ax.kind == SWITCH:
      moving = delta != 0
      hop(moving, k, 0)
      cur[moving, k] = target[moving, k]
      hop(moving, k, 1)
      latency += 2 * ax.latency * moving
      continue
    if ax.kind == RING:
      fwd = delta % ax.size
      step = np.where(fwd <= ax.size - fwd, 1, -1)
      hops = np.where(step > 0, fwd, ax.size - fwd)
    else:
      step, hops = np.sign(delta), np.abs(delta)
    for s in range(int(hops.max(initial=0))):
      moving = hops > s
      hop(moving, k, (step[moving] < 0).astype(np.int64))
      cur[moving, k] = (cur[moving, k] + step[moving]) % ax.size
    latency += hops * ax.latency
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
  return cat(msg), cat(link), latency


@dataclass(frozen=True)
class StepCost:
  seconds: float
  max_link_bytes: float
  max_hops: int


def step_cost(net: Network, src, dst, nbytes: float) -> StepCost:
  """One step in which every (src, dst) message of `nbytes` is in flight at once."""
  src = np.asarray(src, np.int64).ravel()
  msg, link, latency = route_links(net, src, dst)
  loads = np.bincount(link, minlength=net.size * len(net.axes) * 2) * float(nbytes)
  bw = np.tile(np.repeat([a.bandwidth for a in net.axes], 2), net.size)
  wire = float(np.max(loads / bw, initial=0.0))
  if net.injection_bw:
    wire = max(wire, float(np.bincount(src).max(initial=0)) * nbytes / net.injection_bw)
  hops = int(np.bincount(msg, minlength=len(src)).max(initial=0))
  return StepCost(wire + float(latency.max(initial=0.0)), float(loads.max(initial=0.0)), hops)


# --- collectives over the groups of one logical axis (all groups run at once) ----------------------------

@dataclass(frozen=True)
class Cost:
  seconds: float
  steps: int
  max_link_bytes: float  # the most bytes one link carries in one step
  max_hops: int

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.seconds + other.seconds, self.steps + other.steps,
                max(self.max_link_bytes, other.max_link_bytes), max(self.max_hops, other.max_hops))


def _repeat(step: StepCost, n: int) -> Cost:
  return Cost(step.seconds * n, n, step.max_link_bytes, step.max_hops)


def _ring_step(net: Network, members: np.ndarray, nbytes: float) -> StepCost:
  """Bidirectional ring: each member sends half its chunk to the next member and half to the previous."""
  nxt, prv = np.roll(members, -1, 1), np.roll(members, 1, 1)
  return step_cost(net, np.concatenate([members, members], None), np.concatenate([nxt, prv], None), nbytes / 2)


def reduce_scatter(net: Network, members: np.ndarray, nbytes: float) -> Cost:
  """Ring reduce-scatter of an `nbytes` vector: n - 1 steps of nbytes / n per member."""
  n = members.shape[1]
  return _repeat(_ring_step(net, members, nbytes / n), n - 1) if n > 1 else Cost(0.0, 0, 0.0, 0)


def all_gather(net: Network, members: np.ndarray, nbytes: float) -> Cost:
  """Ring all-gather into an `nbytes` vector: the same traffic as the reduce-scatter."""
  return reduce_scatter(net, members, nbytes)


def ring_allreduce(net: Network, members: np.ndarray, nbytes: float) -> Cost:
  """Reduce-scatter then all-gather around the ring in member order."""
  return reduce_scatter(net, members, nbytes) + all_gather(net, members, nbytes)


def tree_allreduce(net: Network, members: np.ndarray, nbytes: float) -> Cost:
  """Binomial-tree reduce to member 0, then broadcast back: 2 ceil(log2 n) steps of the whole vector."""
  n, total = members.shape[1], Cost(0.0, 0, 0.0, 0)
  for k in range(math.ceil(math.log2(n)) if n > 1 else 0):
    senders = np.arange(2 ** k, n, 2 ** (k + 1))
    up, down = members[:, senders], members[:, senders - 2 ** k]
    total = total + _repeat(step_cost(net, up, down, nbytes), 1) + _repeat(step_cost(net, down, up, nbytes), 1)
  return total


def torus_allreduce(net: Network, placement: Placement, axis: str, nbytes: float) -> Cost:
  """Dimension-wise: a ring reduce-scatter along each physical piece of the axis in turn (the vector shrinking
  by each piece's count), then the all-gathers in reverse, which cost the same. Pieces go in the cheapest order
  (the uncontended long ring first takes the big vector)."""
  def cost(order):
    total, size = Cost(0.0, 0, 0.0, 0), nbytes
    for j in order:
      total = total + reduce_scatter(net, groups(placement, axis, j), size)
      size /= placement.pieces[axis][j][1]
    return total + total

  orders = itertools.permutations(range(len(placement.pieces[axis])))
  return min((cost(o) for o in itertools.islice(orders, 24)), key=lambda c: c.seconds)


def all_to_all(net: Network, members: np.ndarray, nbytes: float) -> Cost:
  """Every member sends nbytes / n to every other member, all messages at once."""
  n = members.shape[1]
  i, j = np.nonzero(~np.eye(n, dtype=bool))
  return _repeat(step_cost(net, members[:, i], members[:, j], nbytes / n), 1) if n > 1 else Cost(0.0, 0, 0.0, 0)


# --- closed forms for one whole physical axis ----------------------------------------------------------------

def max_hops(axis: Axis) -> int:
  """The longest shortest route along one axis."""
  return {RING: axis.size // 2, LINE: axis.size - 1, SWITCH: 2 if axis.size > 1 else 0}[axis.kind]


def all_to_all_link_bytes(axis: Axis, message: float) -> float:
  """Bytes on the busiest link when every member of the axis sends `message` to every other member."""
  n = axis.size
  if axis.kind == RING:  # odd: sum of distances 1..(n-1)/2 per direction; even: the + way also takes n/2.
    return message * ((n * n - 1) / 8 if n % 2 else n * (n + 2) / 8)
  if axis.kind == LINE:
    return message * (n // 2) * ((n + 1) // 2)
  return message * (n - 1)


def ring_allreduce_seconds(axis: Axis, nbytes: float) -> float:
  """Bidirectional ring allreduce over one whole physical axis, every such ring at once: 2(n-1) steps. On a
  ring (n >= 3) each link carries one half-chunk a step over one hop; on a line or switch the closing message
  doubles the load and takes the longest route."""
  n = axis.size
  if n == 1:
    return 0.0
  if axis.kind == RING and n >= 3:
    return 2 * (n - 1) * (nbytes / (2 * n) / axis.bandwidth + axis.latency)
  return 2 * (n - 1) * (nbytes / n / axis.bandwidth + max_hops(axis) * axis.latency)


def write_rank_file(path, net: Network, placement: Placement) -> None:
  """One line per rank (rank r on the r-th non-comment line, r row-major over (dp, pp, tp)): its physical
  coordinates as `(c0,c1,...)` in the order of the header. A plain documented format in the style of one
  coordinate tuple per line; Fujitsu MPI's own files use the job's 1-3D logical coordinates, which a fold of
  these 6D ones would give."""
  coords = net.coords(placement.nodes.ravel())
  lines = [f"# {net.name} rank file: {net.size} ranks, coordinates ({','.join(a.name for a in net.axes)}) "
           f"of shape {'x'.join(map(str, net.shape))}"]
  lines += ["(" + ",".join(map(str, c)) + ")" for c in coords.tolist()]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def read_rank_file(path, net: Network) -> np.ndarray:
  """The node id of each rank in a file from `write_rank_file`."""
  with open(path) as f:
    rows = [tuple(int(v) for v in line.strip().strip("()").split(",")) for line in f
            if line.strip() and not line.startswith("#")]
  return np.ravel_multi_index(tuple(np.array(rows).T), net.shape)


def fold_3d(net: Network, nodes) -> np.ndarray:
  """(..., 3) logical 3D coordinates of Tofu-D nodes, the form of Fujitsu MPI's rank maps and of pjsub's
  `node=XxYxZ` shape: x folds (X, a), y folds (Y, b), z folds (Z, c), each as a snake (the inner coordinate
  runs backwards on odd outer ones) so that logical neighbours are physical neighbours. Axes past the six
  (the CMG axis) are dropped."""
  c = net.coords(nodes)[..., :6]
  out = []
  for outer, inner in ((0, 3), (1, 4), (2, 5)):
    n = net.axes[inner].size
    snake = np.where(c[..., outer] % 2 == 1, n - 1 - c[..., inner], c[..., inner])
    out.append(c[..., outer] * n + snake)
  return np.stack(out, -1)


def node_shape_3d(net: Network) -> tuple[int, int, int]:
  """pjsub's `node=XxYxZ` for the job (X*a, Y*b, Z*c)."""
  s = net.shape
  return (s[0] * s[3], s[1] * s[4], s[2] * s[5])


def write_fujitsu_rank_map(path, net: Network, placement: Placement) -> None:
  """A rank map for `#PJM --mpi "rank-map-hostfile=FILE"`: line r is rank r's node as `(x,y,z)` in the job's
  logical 3D shape (fold_3d); with one process per CMG a node's line repeats for each of its ranks."""
  cmgs = net.axes[-1].size if net.axes[-1].name == "cmg" else 1
  slots = placement.nodes.ravel()
  node_net = Network(net.name, net.axes[:6], net.tight_order)
  coords = fold_3d(node_net, slots // cmgs)
  with open(path, "w") as f:
    f.write("".join("(" + ",".join(map(str, c)) + ")\n" for c in coords.tolist()))
