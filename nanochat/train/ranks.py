"""Rank processes of data-parallel training: how they start (``launch``, ``--nproc``), how they
talk (the ``Communicator`` interface: ``SingleProcess``, ``MPICommunicator``; NCCL lives in
``backends.cupy_backend.nccl``), and how they stop together (``StopFlag``, one error line,
``agree_on_failure``). The data-parallel step itself is ``nanochat.train.distributed``."""
from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np

SIZE_ENV_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi(environ=None):
    """Whether an MPI launcher (mpiexec/mpirun, MPICH's Hydra, Open MPI, MVAPICH) started this
    process as one of more than one rank. ``NANOCHAT_NO_MPI=1`` says no."""
    env = os.environ if environ is None else environ
    if env.get("NANOCHAT_NO_MPI"):
        return False
    for key in SIZE_ENV_VARS:
        value = env.get(key, "")
        if value.strip().isdigit():
            return int(value) > 1
    return False


# ----------------------------------------------------------------------------- communicators

class Communicator:
    """What data parallelism needs from a runtime. Buffers are 1-D contiguous arrays.

    ``reduce(buf, root)`` sums ``buf`` over ranks into ``buf`` on ``root`` (other ranks' buffers
    are left as they were) and ``bcast(buf, root)`` copies root's ``buf`` to everyone; both
    return a handle for ``wait_all``. ``allgather_values(v)`` returns a float64 array
    ``[size, len(v)]`` (small, blocking). ``gather_arrays`` and ``bcast_object`` are for
    checkpoints and set-up, never the step.
    """

    rank = 0
    size = 1
    local_rank = 0
    name = "single"

    @property
    def is_main(self):
        return self.rank == 0

    def reduce(self, buf, root):
        return None

    def bcast(self, buf, root):
        return None

    def wait_all(self, handles):
        pass

    def progress(self, handles):
        """Let started collectives advance (MPI progresses only inside MPI calls)."""

    def allgather_values(self, values):
        return np.asarray(values, dtype=np.float64).reshape(1, -1)

    def gather_arrays(self, arrays, root=0):
        return dict(arrays)

    def bcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)


class SingleProcess(Communicator):
    """One rank: every collective is the identity."""


class MPICommunicator(Communicator):
    """MPI through mpi4py on host (NumPy) buffers; device arrays are staged through the host."""

    name = "mpi"

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = local.Get_rank()
        self.local_size = local.Get_size()
        local.Free()

    def reduce(self, buf, root):
        MPI = self.MPI
        if self.rank == root:
            return self.comm.Ireduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=root)
        return self.comm.Ireduce(buf, None, op=MPI.SUM, root=root)

    def bcast(self, buf, root):
        return self.comm.Ibcast(buf, root=root)

    def wait_all(self, handles):
        handles = [h for h in handles if h is not None]
        if handles:
            self.MPI.Request.Waitall(handles)

    def progress(self, handles):
        handles = [h for h in handles if h is not None]
        if handles:
            self.MPI.Request.Testall(handles)

    def allgather_values(self, values):
        mine = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        out = np.empty((self.size, mine.size), dtype=np.float64)
        self.comm.Allgather(mine, out)
        return out

    def gather_arrays(self, arrays, root=0):
        """Every rank's ``{name: array}`` merged on ``root`` ({} elsewhere): a small pickled
        manifest, then each array as raw bytes through the buffer API (no size limit of pickle)."""
        manifest = [(k, np.asarray(a).dtype.str, tuple(np.shape(a))) for k, a in arrays.items()]
        manifests = self.comm.gather(manifest, root=root)
        if self.rank != root:
            for a in arrays.values():
                raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                self.comm.Send(raw, dest=root, tag=71)
            return {}
        out = dict(arrays)
        for src, entries in enumerate(manifests):
            if src == root:
                continue
            for key, dtype, shape in entries:
                dt = np.dtype(dtype)
                raw = np.empty(int(np.prod(shape, dtype=np.int64)) * dt.itemsize, dtype=np.uint8)
                self.comm.Recv(raw, source=src, tag=71)
                out[key] = raw.view(dt).reshape(shape)
        return out

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def communicator():
    """The communicator for this process: MPI when started by an MPI launcher, else one process."""
    if not launched_by_mpi():
        return SingleProcess()
    try:
        return MPICommunicator()
    except ImportError as exc:
        raise RuntimeError(f"started by an MPI launcher but mpi4py cannot be imported ({exc}); "
                           f"pip install -e '.[mpi]'") from None


def for_backend(comm, backend_name):
    """The communicator the step uses with this backend: with the cupy backend and more than one
    rank, NCCL on device buffers (``backends.cupy_backend.nccl``, bootstrapped over ``comm``)."""
    if backend_name == "cupy" and comm.size > 1 and isinstance(comm, MPICommunicator):
        from backends.cupy_backend.nccl import NCCLCommunicator

        return NCCLCommunicator(comm)
    return comm


# ----------------------------------------------------------------------------- process control

class StopFlag:
    """SIGINT sets a flag (``.set``) instead of raising while the block runs: the trainer holds
    Ctrl-C through a parameter update (no checkpoint sees half of one), and data-parallel ranks
    never stop in different places (``DataParallel.agree``). Only the main thread can own signal
    handlers; elsewhere this does nothing."""

    def __init__(self):
        self.set = False
        self._installed = False
        self._previous = None

    def __enter__(self):
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._installed:
            # None means a handler installed outside Python; the default is the closest we can restore
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
        return False


class SilentBar:
    """Progress bar of ranks other than 0."""

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass

    def write(self, *a, **k):
        pass

    def close(self):
        pass


class NullLogger:
    """Metrics sink of ranks other than 0."""

    path = None
    tb_dir = None

    def log(self, record):
        pass

    def close(self):
        pass


def one_line(exc):
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (RuntimeError, ValueError, OSError)) else str(exc)
    return " ".join(text.split())


def install_excepthook(comm):
    """An uncaught exception on this rank prints one ``error: rank r of N: ...`` line and aborts
    every rank (as ``python -m mpi4py`` does), so no rank waits forever in a collective."""
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            print(f"error: rank {comm.rank} of {comm.size}: interrupted", file=sys.stderr, flush=True)
        else:
            print(f"error: rank {comm.rank} of {comm.size}: {one_line(exc)}", file=sys.stderr, flush=True)
        if os.environ.get("NANOCHAT_TRACEBACK"):
            sys.__excepthook__(exc_type, exc, tb)
        comm.abort(1)

    sys.excepthook = hook


def agree_on_failure(comm, exc):
    """Set-up errors: every rank learns whether any rank failed; only the lowest failing rank
    prints. Returns the message to print on this rank (or None), and whether any rank failed."""
    flags = comm.allgather_values([1.0 if exc is not None else 0.0])[:, 0]
    failed = [r for r in range(comm.size) if flags[r] > 0]
    if not failed:
        return None, False
    if comm.rank == failed[0]:
        prefix = f"rank {comm.rank} of {comm.size}: " if comm.size > 1 and comm.rank != 0 else ""
        return f"error: {prefix}{exc}", True
    return None, True


def mpiexec_path():
    """The MPI launcher next to this Python (the mpich wheel's), else the one on PATH."""
    import shutil
    from pathlib import Path

    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if (here / name).exists():
            return str(here / name)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise RuntimeError("--nproc needs an MPI launcher: pip install -e '.[mpi]' (mpi4py and the mpich wheel)")
    return found


def launch(nproc, argv, threads=None):
    """Run ``python -m nanochat.train argv`` as ``nproc`` ranks on this machine; returns the exit code.

    Each rank gets ``NANOCHAT_THREADS`` = cores / nproc (at least 1) unless the variable is set.
    """
    import subprocess

    env = dict(os.environ)
    if "NANOCHAT_THREADS" not in env:
        env["NANOCHAT_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    cmd = [mpiexec_path(), "-n", str(nproc), sys.executable, "-m", "nanochat.train", *argv]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # mpiexec forwards the signal to the ranks; wait for their checkpoint
        return proc.wait()


def strip_nproc(argv):
    """``(n, argv without --nproc N)``; n is None when absent."""
    out, n, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n = argv[i + 1]
            i += 2
            continue
        if a.startswith("--nproc="):
            n = a.split("=", 1)[1]
            i += 1
            continue
        out.append(a)
        i += 1
    if n is not None:
        try:
            n = int(n)
        except ValueError:
            raise ValueError(f"--nproc must be a whole number of processes, got {n!r}") from None
        if not 1 <= n <= 1024:
            raise ValueError(f"--nproc must lie in [1, 1024], got {n}")
    return n, out
