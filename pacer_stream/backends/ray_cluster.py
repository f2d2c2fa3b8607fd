"""The Ray backend: a unit stage's units as Ray tasks, on machines that share storage.

The driver (this process) keeps the RunState and folds results in unit order, so the
bookkeeping, the sums and therefore the bytes are the local run's. Each task builds the
run's context from the plan (headers only, cached per worker process), adopts what the
earlier stages handed on (``stage.shared``: permutations, the decision, vocabulary
rows), and runs one unit: it reads the inputs and writes its unit's own shard files
(``--shard-layout unit``: no two tasks write one file). A task asks Ray for the memory
the accounting gives its unit, the same figure that sizes its reads, so Ray places no
more tasks on a machine than fit. A worker that dies mid-unit is retried by Ray (the
unit's slots are simply written again); a driver that dies leaves the state as a local
run would, and the next run resumes it.
"""

from __future__ import annotations

import pickle
import socket

from ..errors import PacerError
from ..job import MergeContext, RunOptions
from ..sizes import format_size

INSTALL = 'pip install "pacer-stream[ray]"'
RETRIES = 3  # a unit whose worker died is run again this many times


def import_ray():
    try:
        import ray
    except ImportError:
        raise PacerError(f"--backend ray needs Ray, which is not installed; install it with "
                         f"{INSTALL}, or run with --backend local") from None
    return ray


class RayBackend:
    name = "ray"

    def __init__(self, config, options: RunOptions) -> None:
        self.ray = ray = import_ray()
        if options.address is not None:
            check_address(options.address)  # Ray itself retries a dead one for minutes
        if not ray.is_initialized():  # (a Python caller may have joined a cluster already)
            try:
                ray.init(address=options.address, log_to_driver=False,
                         include_dashboard=False, logging_level="ERROR")
            except ConnectionError as exc:
                raise PacerError(f"--address {options.address}: the Ray cluster there did not "
                                 f"take this driver ({str(exc).splitlines()[0]}); a cluster of "
                                 "Ray 2.59 or newer wants its token: set RAY_AUTH_MODE=token, "
                                 "with the token of `ray get-auth-token` in ~/.ray/auth_token "
                                 "or RAY_AUTH_TOKEN") from None
        self.spec = pickle.dumps((config, options))
        self._call = ray.remote(max_retries=RETRIES)(call_task)

    def map_stage(self, stage, ctx: MergeContext, units: list[str]):
        """A unit stage's units as tasks: (unit, result) in unit order."""
        if not units:
            return iter(())
        if hasattr(stage, "writes"):
            check_disjoint(stage, ctx, units)
        shared = (stage, stage.shared(ctx) if hasattr(stage, "shared") else None)
        # one figure for the stage, its largest unit's: tasks that ask for the same
        # resources share worker processes (each new shape would start its own)
        memory = max(stage.memory(ctx, u) for u in units)
        return zip(units, self.map_calls(stage_unit, ctx, units, shared, memory, stage.name))

    def map_calls(self, fn, ctx: MergeContext, units: list[str], shared, memory: int,
                  label: str):
        """``fn(ctx, shared, unit)`` as one task a unit (``fn`` a module-level function, so
        workers import it), each asking for ``memory``; results in unit order."""
        if not units:
            return
        shared = self.ray.put(shared)
        task = self._call.options(num_cpus=1, memory=self._memory(ctx, label, memory))
        refs = [task.remote(self.spec, fn, shared, u) for u in units]
        yield from self._in_order(ctx, units, refs)

    def _memory(self, ctx: MergeContext, stage: str, need: int) -> int:
        """``need``, refused up front if no machine of the cluster offers that much to its
        tasks: Ray would queue the tasks forever."""
        largest = max((node["Resources"].get("memory", 0) for node in self.ray.nodes()
                       if node.get("Alive")), default=0)
        if need > largest:
            raise PacerError(f"the {stage} stage's tasks need {format_size(need)} each "
                             f"(--max-memory {format_size(ctx.budget)}), more than the largest "
                             f"machine of the Ray cluster offers its tasks "
                             f"({format_size(int(largest))}); give a smaller --max-memory "
                             "(each task stays inside it), or machines with more memory")
        return need

    def _in_order(self, ctx: MergeContext, units: list[str], refs: list):
        """Results in unit order; the bytes a task read join this run's count. Tasks not
        yet collected are cancelled if the driver stops early (an error, a signal)."""
        done = 0
        try:
            for ref in refs:
                result, read = self.ray.get(ref)
                done += 1
                ctx.summary.read_bytes += read
                yield result
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
            if isinstance(cause, PacerError):
                raise cause from None
            raise
        except (self.ray.exceptions.WorkerCrashedError,
                self.ray.exceptions.OutOfMemoryError) as exc:
            raise PacerError(f"unit {units[done]}: its Ray worker died {RETRIES + 1} times "
                             f"({type(exc).__name__}: out of memory, or killed); finished units "
                             "are saved: fix the machine or lower --max-memory, then re-run the "
                             "same command to resume") from None
        finally:
            for ref in refs[done:]:
                self.ray.cancel(ref, force=True)


def check_disjoint(stage, ctx: MergeContext, units: list[str]) -> None:
    """No two units of a stage may write one file: their tasks run at once."""
    writer: dict[str, str] = {}
    for unit in units:
        for file in stage.writes(ctx, unit):
            if writer.setdefault(file, unit) != unit:
                raise AssertionError(f"{file}: units {writer[file]} and {unit} would both "
                                     "write it; the Ray backend needs the unit shard layout")


def check_address(address: str) -> None:
    """Refuse at once an address where nothing listens."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not host:port"
        raise PacerError(f"--address {address}: no Ray cluster answers there ({reason}); "
                         "start one with `ray start --head`, or leave --address out to start "
                         "one on this machine") from None


# -- in the worker ------------------------------------------------------------------

_context: tuple[bytes, MergeContext] | None = None


def worker_context(spec: bytes) -> MergeContext:
    """The run's context in this worker process, built once per run from the plan."""
    global _context
    if _context is None or _context[0] != spec:
        config, options = pickle.loads(spec)
        _context = (spec, MergeContext.from_plan(config, options))
    return _context[1]


def stage_unit(ctx: MergeContext, shared, unit: str):
    """One unit of a unit stage, with what the earlier stages handed on."""
    stage, products = shared
    if products is not None:
        stage.adopt(ctx, products)
    return stage.run_unit(ctx, unit)


def call_task(spec: bytes, fn, shared, unit: str):
    """A task: ``fn`` on one unit, and the bytes it read (for the driver's count)."""
    ctx = worker_context(spec)
    before = ctx.summary.read_bytes
    result = fn(ctx, shared, unit)
    return result, ctx.summary.read_bytes - before
