"""Data-parallel training: communicators, gradient buckets and sharded optimizer state.

``mpiexec -n N python -m nanochat.train ...`` starts N ranks. Each rank holds a full replica of
the weights, reads its own disjoint rows of every global batch (``nanochat.data.loader``'s
``shard``), and runs forward and backward on them. Then, once per optimizer step (after the
last micro-batch when ``grad_accum > 1``):

1. **Gradients** are copied into one flat buffer (model order) split into buckets of at most
   ``bucket_bytes`` that never span two owners (``plan_ownership``: every parameter, or row block
   of a large AdamW/Lion tensor, belongs to exactly one rank). Each bucket is summed onto its
   owner with a nonblocking ``Ireduce`` (together the buckets form a reduce-scatter: every rank
   receives the summed gradient of exactly what it updates, ZeRO-2). Buckets are filled from
   the last parameter backwards and each reduction starts as soon as its bucket is filled.
2. **Loss numbers, "had a gradient" flags** travel in one small ``Allgather`` of float64
   values, summed in rank order, so every rank computes the same numbers bit for bit.
3. **Clipping**: each rank sums the squares of its own gradient shard in float64; the N
   partial sums are all-gathered and added in rank order, so the global norm (and the clip
   factor) is the same on every rank.
4. **Optimizer**: each rank steps only what it owns (the others' ``.grad`` is ``None``, which
   every optimizer skips; a row block is stepped through a ``RowShard``), so it keeps optimizer
   state only for that (ZeRO-1): Muon/GaLore matrices whole, AdamW/Lion tensors whole or by rows.
5. **Parameters**: the weights live in one flat buffer too (each parameter's ``.data`` is a
   view into it); the owner of every bucket broadcasts its updated values (``Ibcast``), so all
   replicas are bitwise identical after every step.

Bytes per step and rank: ``(N-1)/N`` of the gradients (reduce) plus ``(N-1)/N`` of the weights
(broadcast), the same as one all-reduce. ``docs/distributed.md`` has the cost model.

The communicator is an interface (``nanochat.train.ranks.Communicator``) with a one-process
version (``SingleProcess``), MPI through mpi4py (``MPICommunicator``, NumPy host buffers, buffer
API with ``MPI.IN_PLACE``, nothing pickled in the step) and NCCL for CuPy device buffers
(``backends.cupy_backend.nccl``; nothing above ``backends/`` imports cupy). How ranks start and
stop together is ``nanochat.train.ranks`` too.
"""
from __future__ import annotations

import time

import numpy as np

from nanochat.train.ranks import StopFlag

DEFAULT_BUCKET_BYTES = 4 << 20  # 4 MiB: large enough for bandwidth, small enough to pipeline
# ----------------------------------------------------------------------------- ownership

def assign_owners(items, size):
    """Owner rank of every item: greedy largest-first onto the least-loaded rank.

    ``items`` is a list of ``(key, cost)``; ties go to the lowest rank and equal costs keep the
    list's order, so every rank computes the same answer. Returns ``{key: rank}``.
    """
    load = [0] * size
    owner = {}
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    for i in order:
        key, cost = items[i]
        r = min(range(size), key=lambda k: (load[k], k))
        owner[key] = r
        load[r] += cost
    return owner


def state_bytes_of(opt, index):
    """Bytes of optimizer state parameter ``index`` of ``opt`` will hold (from its spec)."""
    spec = opt._param_spec(index)
    total = 8  # the step counter
    for shape, dtype in spec.values():
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


class _ShapeOnly:
    """A parameter stand-in with a shape and dtype but no memory (zero-stride view)."""

    def __init__(self, shape, dtype):
        self.data = np.broadcast_to(np.zeros((), dtype=dtype), tuple(shape))
        self.grad = None


def state_bytes_per_rank(cfg, size, dtype=np.float32):
    """Optimizer-state bytes each of ``size`` ranks holds for config ``cfg`` once every parameter
    has stepped (the trainer's optimizers and ownership rule, from the parameter table alone: no
    weights are allocated, so it works for the 3B preset on a laptop). Returns a list over ranks."""
    from types import SimpleNamespace

    from nanochat.model.params import parameter_table
    from nanochat.train.trainer import build_optimizers

    table = parameter_table(cfg.model)
    model = SimpleNamespace(params={s.name: _ShapeOnly(s.shape, dtype) for s in table}, be=None,
                            param_groups=lambda: {s.name: s.group for s in table})
    optimizers = build_optimizers(model, cfg)
    by_id = {id(p): n for n, p in model.params.items()}
    slots = {by_id[id(p)]: (opt, i) for _, opt, _ in optimizers for i, p in enumerate(opt.params)}
    names = list(model.params)
    shapes = {n: tuple(model.params[n].data.shape) for n in names}
    plan = plan_ownership(names, shapes, slots, size)
    out = [0] * size
    for n, (opt, i) in slots.items():
        full = state_bytes_of(opt, i)
        rows = shapes[n][0] if shapes[n] else 1
        for lo, hi, r in plan[n]:
            out[r] += 8 + (full - 8) * (hi - lo) // max(rows, 1)
    return out


# ----------------------------------------------------------------------------- data parallel

ELEMENTWISE = ("AdamW", "Lion")  # optimizers whose update is per element: their tensors may be split by rows


class RowShard:
    """Rows ``[lo, hi)`` of a parameter, standing in for it in an elementwise optimizer so that
    the optimizer keeps (and updates) state for those rows only."""

    def __init__(self, param, lo, hi):
        self.param, self.lo, self.hi = param, lo, hi

    @property
    def data(self):
        return self.param.data[self.lo:self.hi]

    @property
    def grad(self):
        g = self.param.grad
        return None if g is None else g[self.lo:self.hi]

    @grad.setter
    def grad(self, value):
        if value is None:
            self.param.grad = None


def plan_ownership(names, shapes, slots, size):
    """Which rank updates which rows: ``{name: [(row_lo, row_hi, rank), ...]}``.

    ``slots[name] = (optimizer, index)`` (absent for parameters no optimizer steps). Muon and
    GaLore matrices stay whole. An AdamW/Lion tensor holding more than a quarter of an even
    share of the state is split into ``min(size, rows)`` row blocks, block ``j`` on rank ``j``;
    every other tensor goes whole to the least-loaded rank, largest first (the rule of
    ``assign_owners``, starting from the split blocks' loads).
    """
    costs = {n: (state_bytes_of(*slots[n]) if n in slots else 0) for n in names}
    share = sum(costs.values()) / size
    plan, load, whole = {}, [0] * size, []
    for n in names:
        rows = shapes[n][0] if shapes[n] else 1
        splittable = n in slots and type(slots[n][0]).__name__ in ELEMENTWISE and len(shapes[n]) >= 1
        if size > 1 and splittable and rows >= 2 and costs[n] > share / 4:
            k = min(size, rows)
            bounds = np.linspace(0, rows, k + 1).astype(int)
            plan[n] = [(int(bounds[j]), int(bounds[j + 1]), j) for j in range(k)]
            for j in range(k):
                load[j] += costs[n] * (bounds[j + 1] - bounds[j]) // rows
        else:
            whole.append((n, costs[n]))
    order = sorted(range(len(whole)), key=lambda i: (-whole[i][1], i))
    for i in order:
        n, cost = whole[i]
        r = min(range(size), key=lambda k: (load[k], k))
        load[r] += cost
        rows = shapes[n][0] if shapes[n] else 1
        plan[n] = [(0, rows, r)]
    return plan


class DataParallel:
    """Flat gradient and weight buffers over ``model.params`` with per-range owners (module doc)."""

    def __init__(self, model, optimizers, comm, bucket_bytes=DEFAULT_BUCKET_BYTES):
        self.model = model
        self.comm = comm
        self.be = model.be
        xp = self.be.xp
        params = model.params
        self.names = list(params)
        by_id = {id(p): name for name, p in params.items()}
        self.slot = {}  # name -> (optimizer, index)
        self.labels = {}  # id(optimizer) -> group label
        for label, opt, _ in optimizers:
            self.labels[id(opt)] = label
            for i, p in enumerate(opt.params):
                self.slot[by_id[id(p)]] = (opt, i)
        self.optimizers = optimizers
        shapes = {n: tuple(params[n].data.shape) for n in self.names}
        self.plan = plan_ownership(self.names, shapes, self.slot, comm.size)
        self.dtype = np.dtype(params[self.names[0]].data.dtype)
        # Layout: model order. Ranges: (start, stop, owner) in flat elements, one per owned row block.
        self.offset, self.ranges, self.range_names, pos = {}, [], [], 0
        for n in self.names:
            size = int(np.prod(shapes[n], dtype=np.int64))
            self.offset[n] = (pos, pos + size)
            row = size // max(shapes[n][0], 1) if shapes[n] else 1
            for lo, hi, r in self.plan[n]:
                self.ranges.append((pos + lo * row, pos + hi * row, r))
                self.range_names.append(n)
            pos += size
        self.numel = pos
        per_bucket = max(1, int(bucket_bytes) // self.dtype.itemsize)
        self.buckets = []  # (start, stop, owner): never straddles two owners
        for lo, hi, r in self.ranges:
            if self.buckets and self.buckets[-1][2] == r and self.buckets[-1][1] == lo \
                    and hi - self.buckets[-1][0] <= per_bucket:
                self.buckets[-1] = (self.buckets[-1][0], hi, r)
                continue
            for s in range(lo, hi, per_bucket):
                self.buckets.append((s, min(s + per_bucket, hi), r))
        self.mine = [(lo, hi) for lo, hi, r in self.ranges if r == comm.rank and hi > lo]
        # Which parameters each bucket holds, and the reverse: a bucket can start once all are ready.
        self.bucket_names = [[n for n in self.names if self.offset[n][0] < stop and self.offset[n][1] > start]
                             for start, stop, _ in self.buckets]
        self.buckets_of = {n: [] for n in self.names}
        for b, names in enumerate(self.bucket_names):
            for n in names:
                self.buckets_of[n].append(b)
        self._handles, self._next = [], 0  # reductions started this step; position in the start order
        self.owns = {n: any(r == comm.rank for _, _, r in self.plan[n]) for n in self.names}
        self.split = {n: [(lo, hi, r) for lo, hi, r in self.plan[n]] for n in self.names if len(self.plan[n]) > 1}
        self.pbuf = xp.empty(self.numel, dtype=self.dtype)
        self.gbuf = xp.empty(self.numel, dtype=self.dtype)
        self.comm_seconds = 0.0  # collective time of the current step
        self.comm_seconds_forward = 0.0  # collectives inside the forward (MoE expert counts)
        self.stop_flag = StopFlag()
        self._sharded = False
        self.bind_params()

    # -- layout
    def view(self, buf, name):
        lo, hi = self.offset[name]
        return buf[lo:hi].reshape(self.model.params[name].data.shape)

    def bind_params(self):
        """Make every parameter's ``.data`` a view into the flat weight buffer (copying the
        current values in). Called at set-up and whenever something replaced a ``.data``."""
        for n in self.names:
            p = self.model.params[n]
            v = self.view(self.pbuf, n)
            if p.data is not v:
                v[...] = p.data
                p.data = v
        self._bound = [self.model.params[n].data for n in self.names]

    def _check_bound(self):
        if any(self.model.params[n].data is not b for n, b in zip(self.names, self._bound)):
            self.bind_params()

    def shard_state(self):
        """Keep only this rank's share of the optimizer state (after set-up or a restore): drop
        the state of parameters owned elsewhere; a row-split tensor's optimizer entry becomes a
        ``RowShard`` of this rank's rows, its state sliced to them."""
        if self._sharded:
            return
        for n in self.names:
            if n not in self.slot:
                continue
            opt, i = self.slot[n]
            mine = [(lo, hi) for lo, hi, r in self.plan[n] if r == self.comm.rank]
            if not mine:
                opt.state[i] = {}
            elif n in self.split:
                lo, hi = mine[0]
                rows = self.model.params[n].data.shape[0]
                opt.params[i] = RowShard(self.model.params[n], lo, hi)
                xp = self.be.xp
                opt.state[i] = {k: (xp.ascontiguousarray(a[lo:hi]) if getattr(a, "ndim", 0) >= 1 and a.shape[0] == rows
                                    else a) for k, a in opt.state[i].items()}
        self._sharded = True

    def state_nbytes(self):
        """Optimizer-state bytes this rank holds."""
        return sum(opt.state_nbytes() for _, opt, _ in self.optimizers)

    def expected_state_nbytes(self):
        """Optimizer-state bytes per rank once every parameter has stepped: a list over ranks."""
        out = [0] * self.comm.size
        for n, (opt, i) in self.slot.items():
            spec_rows = self.model.params[n].data.shape[0] if self.model.params[n].data.ndim else 1
            full = _full_state_bytes(opt, i, tuple(self.model.params[n].data.shape))
            for lo, hi, r in self.plan[n]:
                out[r] += 8 + (full - 8) * (hi - lo) // max(spec_rows, 1)
        return out

    # -- one step
    def reduce(self, record):
        """Sum the gradients onto their owners and average the loss numbers over ranks.

        Afterwards ``.grad`` of a parameter this rank updates (in whole or in part) is a view
        into the flat buffer holding the global mean gradient on this rank's rows; every other
        ``.grad`` is None. ``record``'s loss numbers become the global means and
        ``record["expert_load"]`` the global counts.
        """
        t0 = time.perf_counter()
        comm, params = self.comm, self.model.params
        self._check_bound()
        while self._next < len(self.buckets):  # buckets the backward did not start (or no hook)
            self._start_next()
        handles, self._handles, self._next = self._handles, [], 0
        had = np.array([0.0 if params[n].grad is None else 1.0 for n in self.names])
        loads = record.get("expert_load") or []
        flat_loads = [x for row in loads for x in row]
        small = np.concatenate([[record["loss"], record["ce"], record["mtp"], record["moe_aux"]], had,
                                np.asarray(flat_loads, dtype=np.float64)])
        gathered = comm.allgather_values(small)
        comm.wait_all(handles)
        total = gathered[0].copy()
        for row in gathered[1:]:
            total += row
        for j, key in enumerate(("loss", "ce", "mtp", "moe_aux")):
            record[key] = float(total[j] / comm.size)
        any_grad = total[4:4 + len(self.names)] > 0
        if flat_loads:
            counts = total[4 + len(self.names):].astype(np.int64).tolist()
            width = len(loads[0])
            record["expert_load"] = [counts[i:i + width] for i in range(0, len(counts), width)]
        scale = self.dtype.type(1.0 / comm.size)
        for lo, hi in self.mine:
            seg = self.gbuf[lo:hi]
            seg *= scale
        for j, n in enumerate(self.names):
            params[n].grad = self.view(self.gbuf, n) if (self.owns[n] and any_grad[j]) else None
        self.comm_seconds = time.perf_counter() - t0 + self.comm_seconds_forward
        self.comm_seconds_forward = 0.0
        return record

    def backward_hook(self):
        """``on_leaf_ready`` for the backward of a step's last micro-batch: each bucket's
        reduction starts once every parameter in it has its final gradient, so communication
        overlaps the rest of the backward. Buckets start in one fixed order (last bucket first)
        on every rank, whatever order the gradients complete in (MoE graphs differ between ranks),
        as MPI and NCCL require; a bucket waiting for a late parameter holds back those after it."""
        self._check_bound()
        name_of = {id(p): n for n, p in self.model.params.items()}
        waiting = [set(names) for names in self.bucket_names]
        self._handles, self._next = [], 0

        def ready(leaf):
            n = name_of.get(id(leaf))
            if n is None:
                return
            for b in self.buckets_of[n]:
                waiting[b].discard(n)
            while self._next < len(self.buckets) and not waiting[len(self.buckets) - 1 - self._next]:
                self._start_next()
            self.comm.progress(self._handles)

        return ready

    def _start_next(self):
        """Fill the next bucket in the start order from the parameters' gradients and start its
        reduction onto its owner."""
        b = len(self.buckets) - 1 - self._next
        start, stop, root = self.buckets[b]
        params = self.model.params
        for n in self.bucket_names[b]:
            lo, hi = self.offset[n]
            a, e = max(lo, start), min(hi, stop)
            g = params[n].grad
            if g is None:
                self.gbuf[a:e] = 0
            else:
                self.gbuf[a:e] = g.reshape(-1)[a - lo:e - lo]
        self.be.synchronize()
        self._handles.append(self.comm.reduce(self.gbuf[start:stop], root))
        self._next += 1

    def clip_by_global_norm(self, max_norm):
        """Global gradient norm over all ranks' shards (float64, added in rank order; the same
        on every rank); scales this rank's rows as ``clip_by_global_norm`` does when
        ``max_norm > 0``. Returns the norm."""
        xp = self.be.xp
        params = self.model.params
        live = [(lo, hi) for (lo, hi, r), n in zip(self.ranges, self.range_names)
                if r == self.comm.rank and hi > lo and params[n].grad is not None]
        local = 0.0
        if live:
            sums = [xp.sum(self.gbuf[lo:hi] * self.gbuf[lo:hi], dtype=np.float64) for lo, hi in live]
            local = float(xp.stack(sums).sum())
        t0 = time.perf_counter()
        parts = self.comm.allgather_values([local])[:, 0]
        self.comm_seconds += time.perf_counter() - t0
        total = 0.0
        for v in parts:
            total += float(v)
        norm = float(np.sqrt(total))
        if max_norm > 0:
            factor = max_norm / (norm + 1e-6)
            if np.isfinite(norm) and factor < 1.0:
                for lo, hi in live:
                    seg = self.gbuf[lo:hi]
                    seg *= factor
        return norm

    def gather_params(self):
        """Owners broadcast their updated weights: every replica ends the step identical."""
        t0 = time.perf_counter()
        self.be.synchronize()
        handles = [self.comm.bcast(self.pbuf[start:stop], root) for start, stop, root in self.buckets]
        self.comm.wait_all(handles)
        self.comm_seconds += time.perf_counter() - t0

    def global_expert_counts(self, indices, n_experts):
        """MoE: token-slots per expert summed over all ranks (a small blocking collective per MoE
        layer and micro-batch), for the load-balancing loss of the global batch."""
        xp = self.be.xp
        local = np.bincount(np.asarray(self.be.to_numpy(indices)).reshape(-1), minlength=n_experts)
        t0 = time.perf_counter()
        rows = self.comm.allgather_values(local.astype(np.float64))
        self.comm_seconds_forward += time.perf_counter() - t0
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        return xp.asarray(total)

    def mean_over_rows(self, losses, rows):
        """Validation: per-batch means weighted by each rank's rows, then the mean over batches
        (what one process computes on the whole batches)."""
        vals = np.asarray(losses, dtype=np.float64) * np.asarray(rows, dtype=np.float64)
        parts = self.comm.allgather_values(np.concatenate([vals, np.asarray(rows, dtype=np.float64)]))
        k = len(losses)
        sums, counts = parts[0, :k].copy(), parts[0, k:].copy()
        for row in parts[1:]:
            sums += row[:k]
            counts += row[k:]
        keep = counts > 0
        return float(np.mean(sums[keep] / counts[keep])) if keep.any() else float("nan")

    def describe(self, cfg):
        """One line for the screen: ranks, global batch, the sharded optimizer state."""
        t = cfg.train
        per = self.expected_state_nbytes()
        return (f"data parallel: {self.comm.size} ranks ({self.comm.name}); global batch {self.comm.size} x "
                f"{t.batch_size} x grad_accum {t.grad_accum} = {self.comm.size * t.batch_size * t.grad_accum} "
                f"sequences; optimizer state per rank {', '.join(f'{b / 2**20:.1f}' for b in per)} MiB "
                f"(one process: {sum(_full_state_bytes(o, i, tuple(self.model.params[n].data.shape)) for n, (o, i) in self.slot.items()) / 2**20:.1f} MiB); "
                f"{len(self.buckets)} buckets")

    def agree(self, flag):
        """True on every rank when ``flag`` is true on any (one tiny collective)."""
        return bool(self.comm.allgather_values([1.0 if flag else 0.0]).max() > 0)

    def gather_state(self, local_state):
        """The optimizer state of every rank merged on rank 0 (for a checkpoint); {} elsewhere.

        Row blocks of split tensors are sent as ``key@row`` and joined in row order on rank 0,
        so the checkpoint holds every tensor's state at full shape, whatever the world size."""
        split_keys = {}
        for n in self.split:
            opt, i = self.slot[n]
            split_keys[f"{self.labels[id(opt)]}/{i}."] = n
        tagged = {}
        for key, a in local_state.items():
            prefix = key[:key.index(".") + 1]
            n = split_keys.get(prefix)
            if n is not None and getattr(a, "ndim", 0) >= 1:
                lo = next(lo for lo, hi, r in self.plan[n] if r == self.comm.rank)
                tagged[f"{key}@{lo}"] = a
            else:
                tagged[key] = a
        merged = self.comm.gather_arrays(tagged, root=0)
        if not self.comm.is_main:
            return {}
        out, blocks = {}, {}
        for key, a in merged.items():
            if "@" in key:
                base, lo = key.rsplit("@", 1)
                blocks.setdefault(base, []).append((int(lo), a))
            else:
                out[key] = a
        for base, parts in blocks.items():
            out[base] = np.concatenate([a for _, a in sorted(parts, key=lambda t: t[0])], axis=0)
        return out

    def weights_hash(self):
        """A digest of all weights (tests: replicas must agree bit for bit)."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.be.to_numpy(self.pbuf)).tobytes()).hexdigest()


def _full_state_bytes(opt, index, shape):
    """State bytes of parameter ``index`` at its full ``shape`` (even while a RowShard stands in)."""
    p = opt.params[index]
    if isinstance(p, RowShard):
        spec = opt._state_spec(shape, p.param.data.dtype)
    else:
        spec = opt._param_spec(index)
    return 8 + sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in spec.values())
