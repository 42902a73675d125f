"""Pipeline schedules as data: which micro-step every stage runs at every tick (pure Python/numpy, no JAX).

  sched = make_schedule("1f1b", stages=4, micro_batches=8)
  print(render_text(sched)); sched.bubble_fraction, megatron_bubble(4, 8)

A tick is one forward or one backward of one model chunk on one device. Virtual stage v = c * S + s is chunk c
of device s (Megatron's interleaved layout); forwards go v -> v + 1 and backwards v + 1 -> v, so a message
always goes to the next (previous) device on the ring. Each device runs its own order of micro-steps:
  gpipe        all M forwards, then all M backwards (M micro-batches' residuals kept per device).
  1f1b         S - s - 1 warm-up forwards, then one forward / one backward alternately (PipeDream-Flush,
               Narayanan et al. 2021), so at most S micro-batches are in flight per device.
  interleaved  V chunks per device; forwards in groups of S micro-batches, chunk by chunk, warm-up of
               2 (S - s - 1) + (V - 1) S forwards, then 1F1B (Megatron-LM's interleaved schedule; M % S == 0).
The ticks are then placed as soon as possible: a forward needs its input from the previous virtual stage in an
earlier tick, a backward its cotangent from the next one (the last stage's backward its own forward).

Three kinds of values wait in per-device buffers; the schedule names their rows (reused once read for the last
time, so the slot counts are the buffers' sizes):
  slot / recv_slot            a stage input, from its arrival (`recv_slot`: the row a message arriving at that tick
                              is written to, -1: none) to its forward (`slot`: the row it reads).
  grad_slot / recv_grad_slot  a cotangent, from its arrival to its backward (`grad_slot`); the last virtual stage's
                              forward writes the loss's cotangent of its output to its own `grad_slot`.
  res_slot                    the stage's residuals (what its backward needs under the remat policy): written by a
                              forward, read by the backward of the same micro-batch and chunk.
"""
from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("gpipe", "1f1b", "interleaved")
IDLE, FORWARD, BACKWARD = 0, 1, 2
FIELDS = ("action", "micro", "chunk", "slot", "grad_slot", "recv_slot", "recv_grad_slot", "res_slot")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A tick table: `table[t, s]` holds FIELDS for device s at tick t (int32 [T, S, len(FIELDS)])."""
  kind: str
  stages: int
  micro_batches: int
  virtual: int
  table: np.ndarray
  act_slots: int
  grad_slots: int
  res_slots: int

  def field(self, name: str) -> np.ndarray:
    """One field of the table, [T, S]."""
    return self.table[..., FIELDS.index(name)]

  @property
  def ticks(self) -> int:
    return self.table.shape[0]

  @property
  def bubble_fraction(self) -> float:
    """Idle ticks / all ticks, over all devices."""
    return float(np.mean(self.field("action") == IDLE))

  def is_first(self) -> np.ndarray:
    """[T, S] bool: the op runs virtual stage 0 (it embeds)."""
    return (self.field("chunk") == 0) & (np.arange(self.stages) == 0)[None]

  def is_last(self) -> np.ndarray:
    """[T, S] bool: the op runs the last virtual stage (it computes the loss)."""
    return (self.field("chunk") == self.virtual - 1) & (np.arange(self.stages) == self.stages - 1)[None]


def megatron_bubble(stages: int, micro_batches: int, virtual: int = 1) -> float:
  """Megatron's bubble fraction (S - 1) / (V M + S - 1) (Narayanan et al. 2021, section 2.2)."""
  return (stages - 1) / (virtual * micro_batches + stages - 1)


def make_schedule(kind: str, stages: int, micro_batches: int, virtual: int = 1) -> Schedule:
  """The tick table of schedule `kind` for S stages, M micro-batches and V chunks per device."""
  S, M, V = stages, micro_batches, virtual
  _check(kind, S, M, V)
  orders = [_device_order(kind, s, S, M, V) for s in range(S)]
  done_f, done_b, rows = _place(orders, S, M, V)
  table = np.zeros((len(rows), S, len(FIELDS)), np.int32)
  table[..., 3:] = -1
  for t, row in enumerate(rows):
    for s, op in enumerate(row):
      if op is not None:
        table[t, s, :3] = op
  col = FIELDS.index
  L = S * V
  # (device, first tick it is live, (tick, column) of its write, ticks that read it): stage inputs of virtual stages
  # > 0 from their arrival to their forward, cotangents from their arrival (or the loss's, from the last forward)
  # to their backward, residuals from their forward to their backward.
  act = [(v % S, done_f[m, v - 1] + 1, (done_f[m, v - 1] + 1, col("recv_slot")), (done_f[m, v],))
         for m in range(M) for v in range(1, L)]
  grad = [(v % S, done_b[m, v + 1] + 1, (done_b[m, v + 1] + 1, col("recv_grad_slot")), (done_b[m, v],))
          for m in range(M) for v in range(L - 1)]
  grad += [(S - 1, done_f[m, L - 1] + 1, (done_f[m, L - 1], col("grad_slot")), (done_b[m, L - 1],)) for m in range(M)]
  res = [(v % S, done_f[m, v], (done_f[m, v], col("res_slot")), (done_b[m, v],)) for m in range(M) for v in range(L)]
  slots = [max(_assign_slots(table, values, S, col(name)), 1)
           for values, name in ((act, "slot"), (grad, "grad_slot"), (res, "res_slot"))]
  sched = Schedule(kind, S, M, V, table, *slots)
  validate(sched)
  return sched


def _check(kind: str, S: int, M: int, V: int) -> None:
  if kind not in KINDS:
    raise ValueError(f"pipeline schedule must be one of {KINDS}, got {kind!r}")
  if S < 1 or M < 1 or V < 1:
    raise ValueError(f"stages, micro_batches and virtual_stages must be >= 1, got S={S}, M={M}, V={V}")
  if kind != "interleaved" and V != 1:
    raise ValueError(f"{kind} runs one chunk per device (virtual_stages=1), got virtual_stages={V}; "
                     "use pipeline=interleaved for V > 1")
  if kind == "interleaved":
    if V < 2:
      raise ValueError(f"interleaved needs virtual_stages >= 2, got {V}; use pipeline=1f1b for one chunk")
    if M % S:
      lo, hi = (M // S) * S, (M // S + 1) * S
      near = f"{lo} or {hi}" if lo else f"{hi}"
      raise ValueError(f"interleaved (Megatron's layout) needs micro_batches divisible by stages={S}, got "
                       f"micro_batches={M}; use micro_batches={near}")


def _device_order(kind: str, s: int, S: int, M: int, V: int) -> list[tuple[int, int, int]]:
  """Device s's micro-steps in order: (action, micro-batch, chunk)."""
  if kind == "gpipe":
    return [(FORWARD, m, 0) for m in range(M)] + [(BACKWARD, m, 0) for m in range(M)]

  def fwd(k):  # k-th forward: groups of S micro-batches, chunk by chunk within a group.
    g, r = divmod(k, S * V)
    return (FORWARD, g * S + r % S, r // S)

  def bwd(k):
    g, r = divmod(k, S * V)
    return (BACKWARD, g * S + r % S, V - 1 - r // S)

  if kind == "1f1b":
    fwd = lambda k: (FORWARD, k, 0)  # noqa: E731
    bwd = lambda k: (BACKWARD, k, 0)  # noqa: E731
    warm = min(S - s - 1, M)
  else:
    warm = min(2 * (S - s - 1) + (V - 1) * S, M * V)
  n = M * V
  order = [fwd(k) for k in range(warm)]
  for k in range(n - warm):
    order += [fwd(warm + k), bwd(k)]
  return order + [bwd(k) for k in range(n - warm, n)]


def _place(orders, S: int, M: int, V: int):
  """Runs each device's order as soon as its inputs have arrived; returns the ticks of every op and the rows."""
  L = S * V
  done_f = np.full((M, L), -1, np.int64)
  done_b = np.full((M, L), -1, np.int64)
  pos, rows, t = [0] * S, [], 0
  while any(p < len(o) for p, o in zip(pos, orders)):
    row = [None] * S
    for s in range(S):
      if pos[s] == len(orders[s]):
        continue
      a, m, c = orders[s][pos[s]]
      v = c * S + s
      if a == FORWARD:
        ready = v == 0 or 0 <= done_f[m, v - 1] < t
      else:
        ready = 0 <= done_f[m, v] < t and (v == L - 1 or 0 <= done_b[m, v + 1] < t)
      if ready:
        row[s] = (a, m, c)
        pos[s] += 1
    for s, op in enumerate(row):
      if op is not None:
        (done_f if op[0] == FORWARD else done_b)[op[1], op[2] * S + s] = t
    if all(op is None for op in row):
      raise RuntimeError(f"pipeline schedule deadlocked at tick {t} (positions {pos})")
    rows.append(row)
    t += 1
  return done_f, done_b, rows


def _assign_slots(table: np.ndarray, values, S: int, read: int) -> int:
  """Gives every buffered value (device, first live tick, its write, the ticks that read it) the lowest row of its
  device that is free (last read before the value is live) and writes the row into the table; returns the most
  rows any device needs."""
  most = 0
  for s in range(S):
    free_after: list[int] = []  # per row, the tick of its last read
    for _, live, (t_write, write), uses in sorted((x for x in values if x[0] == s), key=lambda x: x[1]):
      slot = next((i for i, f in enumerate(free_after) if f < live), len(free_after))
      if slot == len(free_after):
        free_after.append(0)
      free_after[slot] = max(uses)
      table[t_write, s, write] = slot
      for t in uses:
        table[t, s, read] = slot
    most = max(most, len(free_after))
  return most


def validate(sched: Schedule) -> None:
  """Checks the table's invariants; raises AssertionError naming the first one broken."""
  S, M, V, L = sched.stages, sched.micro_batches, sched.virtual, sched.stages * sched.virtual
  act, mic, chk = sched.field("action"), sched.field("micro"), sched.field("chunk")
  tick_f, tick_b = {}, {}
  for t in range(sched.ticks):
    for s in range(S):
      if act[t, s] != IDLE:
        key = (int(mic[t, s]), int(chk[t, s]) * S + s)
        d = tick_f if act[t, s] == FORWARD else tick_b
        assert key not in d, f"(micro-batch, virtual stage) {key} runs twice"
        d[key] = t
  every = {(m, v) for m in range(M) for v in range(L)}
  assert set(tick_f) == every and set(tick_b) == every, "every micro-batch must pass every stage both ways"
  for (m, v), t in tick_f.items():
    assert v == 0 or tick_f[m, v - 1] < t, f"forward {(m, v)} at tick {t} before its input arrives"
    assert tick_b[m, v] > t, f"backward {(m, v)} before its forward"
  for (m, v), t in tick_b.items():
    assert v == L - 1 or tick_b[m, v + 1] < t, f"backward {(m, v)} at tick {t} before its cotangent arrives"
  for s in range(S):
    _replay_buffers(sched, s)
  if sched.kind == "1f1b":
    assert max_in_flight(sched) <= S, "1F1B keeps at most S micro-batches in flight"


def _replay_buffers(sched: Schedule, s: int) -> None:
  """Replays device s's three buffers tick by tick (messages written at the tick's start, the op's reads, then its
  writes): every read finds the value written for it, every write a free row, and nothing is left at the end."""
  S, L = sched.stages, sched.stages * sched.virtual
  act, mic, chk = sched.field("action"), sched.field("micro"), sched.field("chunk")
  size = {"slot": sched.act_slots, "grad_slot": sched.grad_slots, "res_slot": sched.res_slots}
  held: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in size}

  def put(name, t, value):
    row = int(sched.field(name)[t, s])
    assert 0 <= row < size[name], f"{name} row {row} outside the buffer (device {s}, tick {t})"
    assert row not in held[name], f"{name} row {row} of device {s} overwritten at tick {t}"
    held[name][row] = value

  def take(name, t, want):
    row = int(sched.field(name)[t, s])
    got = held[name].pop(row, None)
    assert got == want, f"{name} at tick {t} device {s} holds {got}, not {want}"

  for t in range(sched.ticks):
    for name, kind, src in (("slot", FORWARD, (s - 1) % S), ("grad_slot", BACKWARD, (s + 1) % S)):
      row = int(sched.field("recv_" + name)[t, s])
      if row >= 0:
        assert t > 0 and act[t - 1, src] == kind, f"{name}: nothing sent to device {s} at tick {t}"
        assert 0 <= row < size[name] and row not in held[name], f"recv_{name} row {row} of device {s} at tick {t}"
        held[name][row] = (int(mic[t - 1, src]), int(chk[t - 1, src]) * S + src)
    if act[t, s] == IDLE:
      continue
    m, v = int(mic[t, s]), int(chk[t, s]) * S + s
    if act[t, s] == FORWARD:
      if v > 0:
        take("slot", t, (m, v - 1))
      put("res_slot", t, (m, v))
      if v == L - 1:
        put("grad_slot", t, (m, L))  # the loss's cotangent of the last stage's output
    else:
      take("grad_slot", t, (m, v + 1))
      take("res_slot", t, (m, v))
  assert not any(held.values()), f"device {s} ends with values never read: {held}"


def max_in_flight(sched: Schedule) -> int:
  """The most (micro-batch, chunk) pairs any device has forwarded and not yet backwarded."""
  act = sched.field("action")
  flight = np.cumsum(act == FORWARD, axis=0) - np.cumsum(act == BACKWARD, axis=0)
  return int(flight.max())


def render_text(sched: Schedule) -> str:
  """The table as text, one line per device: F3 / B3 (micro-batch 3; a..z mark the chunk when V > 1), '.' idle."""
  act, mic, chk = sched.field("action"), sched.field("micro"), sched.field("chunk")
  width = len(str(sched.micro_batches - 1)) + 1 + (sched.virtual > 1)
  lines = [f"{sched.kind} S={sched.stages} M={sched.micro_batches} V={sched.virtual}: {sched.ticks} ticks, "
           f"bubble {sched.bubble_fraction:.3f} (Megatron "
           f"{megatron_bubble(sched.stages, sched.micro_batches, sched.virtual):.3f})"]
  for s in range(sched.stages):
    cells = []
    for t in range(sched.ticks):
      if act[t, s] == IDLE:
        cells.append(".".rjust(width))
      else:
        tag = "FB"[act[t, s] - 1] + str(mic[t, s]) + ("abcdefghijklmnopqrstuvwxyz"[chk[t, s]] if sched.virtual > 1 else "")
        cells.append(tag.rjust(width))
    lines.append(f"stage {s}: " + " ".join(cells))
  return "\n".join(lines)


def render_png(sched: Schedule, path: str) -> None:
  """The table as a picture (forwards blue, backwards orange, shade by chunk, micro-batch written in)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  act, mic, chk = sched.field("action"), sched.field("micro"), sched.field("chunk")
  fig, ax = plt.subplots(figsize=(max(6, sched.ticks * 0.28), 0.45 * sched.stages + 0.9))
  colors = {FORWARD: ("#4c78a8", "#9ecae9"), BACKWARD: ("#f58518", "#ffbf79")}
  for t in range(sched.ticks):
    for s in range(sched.stages):
      if act[t, s] != IDLE:
        ax.add_patch(plt.Rectangle((t, s), 1, 1, color=colors[int(act[t, s])][int(chk[t, s]) % 2], ec="white"))
        ax.text(t + 0.5, s + 0.5, str(mic[t, s]), ha="center", va="center", fontsize=7)
  ax.set_xlim(0, sched.ticks)
  ax.set_ylim(sched.stages, 0)
  ax.set_yticks(np.arange(sched.stages) + 0.5, [f"stage {s}" for s in range(sched.stages)])
  ax.set_xlabel("tick")
  ax.set_title(f"{sched.kind}, S={sched.stages}, M={sched.micro_batches}, V={sched.virtual}: "
               f"bubble {sched.bubble_fraction:.3f}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
