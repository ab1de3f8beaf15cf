"""NCCL communicator for data-parallel training on GPUs (``nanochat.train.distributed``, ``nanochat.train.ranks``).

The step's collectives (gradient ``reduce`` onto each bucket's owner, weight ``bcast`` from it)
run as NCCL calls on CuPy device buffers, in one dedicated stream; the small host-side
collectives (loss numbers, the gradient norm's partial sums, stop flags) and checkpoint gathers
go through the MPI communicator that started the ranks. NCCL is bootstrapped over MPI: rank 0
creates the unique id and broadcasts it.

Rank r uses device ``local_rank mod device_count`` on its host (``local_rank`` from MPI's
shared-memory split), selected before any allocation of the run.

This module duck-types the ``Communicator`` interface of ``nanochat.train.ranks`` (a
backend must not import the layers above it). ``import backends.cupy_backend.nccl`` works
without cupy or a GPU; constructing ``NCCLCommunicator`` needs both, and NCCL.
"""
from __future__ import annotations

import numpy as np


def nccl_status():
    """``(True, version)`` when cupy's NCCL binding loads here, else ``(False, reason)``."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # cupy missing or broken
        return False, f"cupy.cuda.nccl cannot be imported: {exc}"
    if not getattr(nccl, "available", False):
        return False, "cupy was built or installed without NCCL (pip install nvidia-nccl-cu12)"
    try:
        return True, nccl.get_version()
    except Exception as exc:
        return False, f"NCCL does not load: {exc}"


def _nccl_dtype(nccl, dtype):
    table = {
        np.dtype(np.float32): nccl.NCCL_FLOAT32,
        np.dtype(np.float64): nccl.NCCL_FLOAT64,
        np.dtype(np.float16): nccl.NCCL_FLOAT16,
    }
    try:
        return table[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"NCCL communicator: unsupported dtype {np.dtype(dtype)}") from None


class NCCLCommunicator:
    """Device-buffer collectives over NCCL, host collectives over ``mpi`` (an MPI communicator)."""

    name = "nccl"

    def __init__(self, mpi, device=None):
        ok, detail = nccl_status()
        if not ok:
            raise RuntimeError(f"--backend cupy with {mpi.size} ranks needs NCCL: {detail}")
        import cupy
        from cupy.cuda import nccl

        self._cupy = cupy
        self._nccl = nccl
        self.mpi = mpi
        self.rank = mpi.rank
        self.size = mpi.size
        self.local_rank = mpi.local_rank
        n_dev = cupy.cuda.runtime.getDeviceCount()
        if n_dev < 1:
            raise RuntimeError("--backend cupy: no CUDA device on this host")
        self.device = self.local_rank % n_dev if device is None else int(device)
        cupy.cuda.Device(self.device).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi.bcast_object(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    @property
    def is_main(self):
        return self.rank == 0

    def _ready(self):
        # The buffers were written on the current stream: NCCL's stream waits for that work.
        self.stream.wait_event(self._cupy.cuda.get_current_stream().record())

    # -- device collectives (asynchronous on self.stream; wait_all synchronises)
    def reduce(self, buf, root):
        self._ready()
        self.comm.reduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(self._nccl, buf.dtype),
                         self._nccl.NCCL_SUM, root, self.stream.ptr)
        return None

    def bcast(self, buf, root):
        self._ready()
        self.comm.bcast(buf.data.ptr, buf.size, _nccl_dtype(self._nccl, buf.dtype), root, self.stream.ptr)
        return None

    def allreduce(self, buf):
        self._ready()
        dt = _nccl_dtype(self._nccl, buf.dtype)
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dt, self._nccl.NCCL_SUM, self.stream.ptr)
        return None

    def wait_all(self, handles):
        self.stream.synchronize()

    def progress(self, handles):
        pass  # NCCL kernels run on their own stream

    # -- host collectives and control: through MPI
    def allgather_values(self, values):
        return self.mpi.allgather_values(values)

    def gather_arrays(self, arrays, root=0):
        return self.mpi.gather_arrays(arrays, root=root)

    def bcast_object(self, obj, root=0):
        return self.mpi.bcast_object(obj, root=root)

    def barrier(self):
        self.mpi.barrier()

    def abort(self, code=1):
        try:
            self.comm.abort()
        finally:
            self.mpi.abort(code)
