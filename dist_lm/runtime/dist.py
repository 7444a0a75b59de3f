"""Everything distributed, in one place: the only module that imports Horovod.

A `World` is this process's view of the job. `LocalWorld` is one process with no launcher
and no Horovod; `HorovodWorld` is one rank of a job started by `horovodrun` (Gloo or MPI)
or `mpirun`. The training code calls the same methods on either and never asks which.

The gradient step, the part whose semantics the project owns:
    1. every rank r holds b_r of the G global columns (`data.text.column_range`: G // N
       or G // N + 1, contiguous, in rank order) and computes the gradient of its *mean*
       token loss over them, g_r, scaled by its weight w_r = b_r N / G (the stepper
       scales the objective before backward; w_r = 1 when N divides G);
    2. `allreduce_grads()` leaves S * sum_r w_r g_r on every rank, where S is 1 when the
       Horovod build sums (Gloo, MPI, NCCL < 2.10: DistributedTrainer then divides by N in
       `update()` through `rescale_grad`) and 1/N when it averages in the allreduce (NCCL
       >= 2.10). `_average_factor` turns either into the mean gradient
       g = (1/N) sum_r w_r g_r = sum_r (b_r / G) g_r, which is exactly the gradient of the
       mean loss over all G columns, i.e. what one process with G columns computes;
    3. the global norm ||g|| is computed on the device and the gradients are scaled by
       min(1, clip / ||g||) on the device (no host sync);
    4. `update(1)` applies the optimizer with DistributedTrainer's own rescaling.
So N ranks take the same step as one process with G columns, for any N <= G.

With a sampled softmax a step's gradient of the (V, E) embedding/decoder matrices is zero
outside the rows the step touched (its input words, its targets, the shared candidates).
`row_params` (--exchange rows) sends only those rows: the ranks allgather their touched
row ids, and allreduce the rows of the union, then write them back in place. Rows outside
the union are zero on every rank, so the result is the dense allreduce's, for about
|union| x E instead of V x E floats (docs/performance.md).
Each rank's rows are weighted by its w_r like the rest of its gradient.
`clip_mode='local'` instead clips each rank's own gradient g_r before the allreduce, as
the reference notebook does on one GPU: its norm is ||w_r g_r|| / w_r, so the clip scales
w_r g_r to w_r clip(g_r) and the update is sum_r (b_r / G) clip(g_r).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Dict, List, Optional

import mxnet as mx
import numpy as np
from mxnet import gluon

from .launcher_env import launched_by_horovod_or_mpi


def global_norm(arrays: List[mx.nd.NDArray],
                aggregated: Optional[bool] = None) -> mx.nd.NDArray:
    """sqrt(sum of squares) of all arrays, as a (1,) array on their device (no sync).
    aggregated: one multi_sum_sq kernel (default on GPUs) or a dot per array (CPUs)."""
    if aggregated is None:
        aggregated = arrays[0].context.device_type != "cpu"
    if not aggregated:
        # multi_sum_sq runs on one thread on CPU (4.6 ms for the 3.4 M gradient elements
        # of standard_lstm_lm_200); a BLAS dot per array is 1.0 ms (docs/performance.md).
        flat = [a.reshape((-1,)) for a in arrays]
        return mx.nd.sqrt(mx.nd.add_n(*[mx.nd.dot(f, f) for f in flat])).reshape((1,))
    sum_sq = mx.nd.multi_sum_sq(*arrays, num_arrays=len(arrays))  # (len(arrays),)
    return mx.nd.sqrt(mx.nd.sum(sum_sq)).reshape((1,))


class _SGD(mx.optimizer.SGD):
    """Gluon's SGD, with one `sgd_update` (or `sgd_mom_update`) per array on CPU.

    Gluon's SGD updates dense arrays with the aggregated `multi_sgd_update` whatever
    MXNET_OPTIMIZER_AGGREGATION_SIZE says; it exists to save GPU kernel launches, but on
    CPU it runs 4.3x slower than the per-array operators (34.5 against 8.0 ms per step on
    one thread for standard_lstm_lm_200, docs/performance.md). Same update rule, same
    counters and states (checkpoints are unchanged); GPUs keep the aggregated kernel.
    """

    def _update_impl(self, indices, weights, grads, states, multi_precision=False):
        as_list = isinstance(indices, (tuple, list))
        first = weights[0] if as_list else weights
        if multi_precision or first.context.device_type != "cpu" or first.stype != "default":
            return super()._update_impl(indices, weights, grads, states, multi_precision)
        if not as_list:
            indices, weights, grads, states = [indices], [weights], [grads], [states]
        self._update_count(indices)
        kwargs = {"rescale_grad": self.rescale_grad, "lazy_update": self.lazy_update}
        if self.clip_gradient:
            kwargs["clip_gradient"] = self.clip_gradient
        for weight, grad, state, lr, wd in zip(weights, grads, states,
                                               self._get_lrs(indices), self._get_wds(indices)):
            if state is not None:
                mx.nd.sgd_mom_update(weight, grad, state, out=weight, lr=lr, wd=wd,
                                     momentum=self.momentum, **kwargs)
            else:
                mx.nd.sgd_update(weight, grad, out=weight, lr=lr, wd=wd, **kwargs)
        return None


def make_optimizer(name: str, params: dict) -> mx.optimizer.Optimizer:
    """The optimizer instance every trainer gets (local or Horovod)."""
    if name == "sgd":
        return _SGD(**params)
    return mx.optimizer.create(name, **params)


def scale_to_norm(arrays: List[mx.nd.NDArray], norm: mx.nd.NDArray, max_norm: float) -> None:
    """Multiplies arrays in place by min(1, max_norm / norm), on the device (nothing when
    max_norm is 0)."""
    if not max_norm:
        return
    scale = mx.nd.minimum(max_norm / (norm + 1e-12), mx.nd.ones_like(norm))
    for a in arrays:
        a *= scale.as_in_context(a.context)


class World:
    rank = 0
    size = 1
    local_rank = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def context(self, spec: str) -> mx.Context:
        """The device for this rank: 'auto' is GPU local_rank when there are GPUs."""
        gpus = mx.context.num_gpus()
        if spec == "cpu" or (spec == "auto" and gpus == 0):
            return mx.cpu()
        if spec in ("auto", "gpu"):
            if gpus == 0:
                from ..errors import UsageError
                raise UsageError("--context gpu: no GPU is visible to MXNet")
            return mx.gpu(self.local_rank % gpus)
        if spec.startswith("gpu:"):
            return mx.gpu(int(spec[4:]))
        from ..errors import UsageError
        raise UsageError(f"--context must be auto, cpu, gpu or gpu:N, not '{spec}'")

    # Overridden by HorovodWorld; the local versions are identities.
    def make_trainer(self, params, optimizer: str, optimizer_params: dict,
                     fp16_allreduce: bool = False, row_params=()) -> gluon.Trainer:
        """row_params: names of parameters whose gradients are exchanged as touched
        rows (see the module docstring); one process has nothing to exchange."""
        return gluon.Trainer(params, make_optimizer(optimizer, optimizer_params),
                             kvstore=None)

    def _average_factor(self, trainer: gluon.Trainer) -> float:
        return 1.0

    def broadcast_params(self, params) -> None:
        pass

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return obj

    def broadcast_arrays(self, arrays: Optional[Dict[str, np.ndarray]],
                         name: str) -> Dict[str, np.ndarray]:
        """Rank 0's arrays (None on the other ranks) on every rank."""
        return arrays

    def allgather_object(self, obj: Any, name: str) -> List[Any]:
        return [obj]

    def allreduce_sum(self, array: mx.nd.NDArray, name: str) -> mx.nd.NDArray:
        return array

    def max_over_ranks(self, value: float, name: str) -> float:
        return max(self.allgather_object(value, name=name))

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def check_in_sync(self, params, step: int) -> None:
        """Raises RanksOutOfSync on every rank unless all ranks hold bit-identical
        parameters. A device sync and a host copy of every parameter: debugging only."""
        from ..errors import RanksOutOfSync

        digest = hashlib.sha1()
        for name in sorted(params.keys()):
            digest.update(params[name].data().asnumpy().tobytes())
        digests = self.allgather_object(digest.hexdigest(), name=f"sync.{step}")
        if len(set(digests)) > 1:
            raise RanksOutOfSync(f"parameters differ across ranks after step {step}: "
                                 + ", ".join(f"rank {r} {d[:10]}" for r, d in
                                             enumerate(digests)))

    def gradient_step(self, trainer: gluon.Trainer, grads: List[mx.nd.NDArray],
                      clip: float, clip_mode: str, skip_nonfinite: bool = False,
                      rows: Optional[np.ndarray] = None, weight: float = 1.0):
        """Allreduce -> clip the mean gradient -> update (see the module docstring).

        Returns the global norm of the mean gradient before clipping (for
        clip_mode='local': of this rank's gradient) and whether it is finite, each (1,)
        on the device. With skip_nonfinite, a step whose gradient is not finite is not
        applied at all (parameters, optimizer state and counters stay as they were) on
        any rank; deciding that reads one value on the host, so it costs a device sync
        per step. rows: the row ids (n,) this rank's step touched, for a trainer made
        with row_params. weight: the w_r the gradients already carry (module docstring).
        """
        trainer.touched_rows = rows
        if clip_mode == "local":
            norm = global_norm(grads)
            if weight != 1.0:
                norm = norm / weight  # of g_r, not of w_r g_r
            finite = mx.nd.contrib.isfinite(norm)
            if skip_nonfinite:  # the ranks' norms differ: skip only if all skip
                bad = self.allreduce_sum(1 - finite, name="nonfinite.local")
                finite = bad == 0
                if not finite.asscalar():
                    return norm, finite
            scale_to_norm(grads, norm, clip)
            trainer.step(1)
            return norm, finite
        trainer.allreduce_grads()
        norm = global_norm(grads) * self._average_factor(trainer)
        finite = mx.nd.contrib.isfinite(norm)  # the same on every rank
        if skip_nonfinite and not finite.asscalar():
            return norm, finite
        scale_to_norm(grads, norm, clip)
        trainer.update(1)
        return norm, finite


class LocalWorld(World):
    """One process, no launcher: Horovod is not imported at all."""


class HorovodWorld(World):
    def __init__(self, fusion_threshold_mb: Optional[float] = None,
                 cycle_time_ms: Optional[float] = None) -> None:
        # Horovod reads its tuning knobs from the environment at init.
        if fusion_threshold_mb is not None:
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(fusion_threshold_mb * 2 ** 20))
        if cycle_time_ms is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_time_ms)
        import horovod.mxnet as hvd

        self.hvd = hvd
        if "OMPI_COMM_WORLD_RANK" in os.environ and "HOROVOD_GLOO_RENDEZVOUS_ADDR" not in \
                os.environ:
            # Started by mpirun: hand Horovod the communicator mpi4py initialised (with
            # MPI_THREAD_MULTIPLE), so user code can use mpi4py beside Horovod.
            from mpi4py import MPI

            hvd.init(comm=MPI.COMM_WORLD)
        else:
            hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank = hvd.local_rank()
        self.controller = "gloo" if hvd.gloo_enabled() else "mpi"

    def make_trainer(self, params, optimizer: str, optimizer_params: dict,
                     fp16_allreduce: bool = False, row_params=()) -> gluon.Trainer:
        compression = self.hvd.Compression.fp16 if fp16_allreduce else \
            self.hvd.Compression.none
        optimizer = make_optimizer(optimizer, optimizer_params)
        if not row_params:
            return self.hvd.DistributedTrainer(params, optimizer, compression=compression)
        return _row_exchange_trainer(self.hvd)(params, optimizer, compression=compression,
                                               row_params=row_params)

    def _average_factor(self, trainer) -> float:
        # DistributedTrainer sets _average_in_framework when the allreduce sums and
        # update() divides by N; otherwise the allreduce already averaged.
        if self.size > 1 and getattr(trainer, "_average_in_framework", True):
            return 1.0 / self.size
        return 1.0

    def broadcast_params(self, params) -> None:
        self.hvd.broadcast_parameters(params, root_rank=0)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def broadcast_arrays(self, arrays: Optional[Dict[str, np.ndarray]],
                         name: str) -> Dict[str, np.ndarray]:
        # One array at a time: the transient memory is the largest array's, not (as with
        # one pickled object) a few copies of them all, hundreds of MB for Adam's state
        # of a large vocabulary's (V, E) matrices.
        specs = self.broadcast_object(
            None if arrays is None else [(k, v.shape, v.dtype.str) for k, v in
                                         sorted(arrays.items())], name=f"{name}.specs")
        out = {}
        for i, (key, shape, dtype) in enumerate(specs):
            if arrays is not None:  # rank 0 sends, and keeps its own arrays
                self.hvd.broadcast(mx.nd.array(arrays[key], dtype=dtype), root_rank=0,
                                   name=f"{name}.{i}").wait_to_read()
                out[key] = arrays[key]
            else:
                out[key] = self.hvd.broadcast(mx.nd.zeros(shape, dtype=dtype), root_rank=0,
                                              name=f"{name}.{i}").asnumpy()
        return out

    def allgather_object(self, obj: Any, name: str) -> List[Any]:
        return self.hvd.allgather_object(obj, name=name)

    def allreduce_sum(self, array: mx.nd.NDArray, name: str) -> mx.nd.NDArray:
        return self.hvd.allreduce(array, name=name, op=self.hvd.Sum)

    def barrier(self) -> None:
        self.allreduce_sum(mx.nd.zeros((1,)), name="barrier").wait_to_read()

    def shutdown(self) -> None:
        """Waits for every operation still queued in MXNet's engine, then shuts Horovod
        down. A Horovod operation left queued (the stop agreement's last allreduce, whose
        output waits behind an evaluation batch) would run after the shutdown and fail,
        and MXNet's exit handler would print that error with a traceback after the rank's
        last line. Every rank queued the same collectives, so the wait ends; with a peer
        lost they fail instead: the exception being handled reports that, so the error
        is dropped here (MXNet forgets an error once waitall has raised it)."""
        try:
            mx.nd.waitall()
        except mx.base.MXNetError:
            pass
        self.hvd.shutdown()


def _row_exchange_trainer(hvd):
    """Horovod's DistributedTrainer, exchanging the gradients of `row_params` as touched
    rows (module docstring). The other parameters take Horovod's own path unchanged."""

    class RowExchangeTrainer(hvd.DistributedTrainer):
        def __init__(self, params, optimizer, compression, row_params):
            super().__init__(params, optimizer, compression=compression)
            self._row_names = set(row_params)
            self.touched_rows: Optional[np.ndarray] = None  # set before every step
            self.union_rows = 0

        def _allreduce_grads(self):
            if hvd.size() == 1:
                return
            rows = [(i, p) for i, p in enumerate(self._params) if p.name in self._row_names
                    and p.grad_req != "null"]
            if rows:
                if self.touched_rows is None:
                    raise RuntimeError("--exchange rows: the step did not say which rows "
                                       "it touched")
                mine = mx.nd.array(self.touched_rows, dtype="int32")
                union = np.unique(hvd.allgather(mine, name="rows.ids").asnumpy())
                self.union_rows = len(union)  # for the benchmark's bytes per step
                for i, param in rows:
                    self._exchange_rows(i, param.list_grad()[0], union)
            # Horovod's own path for the rest. Its tensor names are positions in the list
            # it walks: the same shortened list on every rank.
            everything = self._params
            self._params = [p for p in everything if p.name not in self._row_names]
            try:
                super()._allreduce_grads()
            finally:
                self._params = everything

        def _exchange_rows(self, i: int, grad: mx.nd.NDArray, union: np.ndarray) -> None:
            # grad (V, ...) is zero outside `union` on every rank; reduce only those rows.
            index = mx.nd.array(union, ctx=grad.context, dtype="int64")         # (n,)
            compact, ctx = self._compression.compress(mx.nd.take(grad, index))  # (n, ...)
            hvd.allreduce_(compact, average=not self._average_in_framework,
                           name=f"rows.{i}", prescale_factor=1.0,
                           postscale_factor=self._postscale_factor)
            grad[index] = self._compression.decompress(compact, ctx)

    return RowExchangeTrainer


def make_world(backend: str = "auto", fusion_threshold_mb: Optional[float] = None,
               cycle_time_ms: Optional[float] = None) -> World:
    """'auto': Horovod when a launcher started this process, else one local process."""
    if backend == "local" or (backend == "auto" and not launched_by_horovod_or_mpi()):
        return LocalWorld()
    return HorovodWorld(fusion_threshold_mb, cycle_time_ms)


def run_everywhere(world: World, fn: Callable[[], Any], what: str) -> Any:
    """Runs fn on every rank and agrees on the outcome, so a bad input on one rank stops
    all ranks with the same message instead of leaving the others in a collective.
    Returns fn's result; raises the first rank's error (by rank order) on every rank."""
    from ..errors import RunDirBusy, RunDirLost, UsageError

    result, error = None, None
    try:
        result = fn()
    except UsageError as err:
        error = (str(err), err.exit_code)  # the kind of error travels with it
    errors = world.allgather_object(error, name=f"agree.{what}")
    first: Optional[tuple] = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first is not None:
        rank, (message, code) = first
        prefix = f"rank {rank}: " if world.size > 1 and (message, code) != error else ""
        kind = next((k for k in (RunDirBusy, RunDirLost) if k.exit_code == code), UsageError)
        raise kind(prefix + message)
    return result
