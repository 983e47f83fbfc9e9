"""``launch``: detectron2's multi-process launcher, also for CPU-only machines (gloo backend),
under torchrun, and safe to kill, interrupt and run twice on one machine.

detectron2 0.6's ``launch`` asserts CUDA and hard-codes NCCL. This one has the same signature and,
on GPUs, the same behaviour (one process per GPU, NCCL). Without a GPU, or with ``device="cpu"``,
it starts the same number of CPU processes that talk through gloo, as upstream detectron2 later
does: ``--num-gpus N`` on a machine without GPUs trains with N data-parallel CPU processes.
Beyond that:

- Rendezvous: with one machine and no ``dist_url`` (or ``"auto"``) the launcher hosts the
  workers' ``TCPStore`` on a port the OS picks while binding it, so any number of runs share a
  machine (a fixed default port made the second one fail with EADDRINUSE). Several machines need
  an explicit ``tcp://<machine 0>:<port>``.
- torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``): nothing is spawned; this process joins the job through ``env://``
  (:func:`torchrun_environment`).
- Workers die with their launcher (:func:`~san_det.engine.parent_watch.exit_with_parent`).
- SIGTERM / SIGINT to the launcher are passed on to the workers, and the launcher waits for them
  (they finish their step and checkpoint, :mod:`san_det.engine.graceful_stop`) instead of dying
  at once; a worker stopped by Ctrl-C outside training exits with status 130, not 0.
"""

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from .. import compat
from .parent_watch import exit_with_parent
from .stop_signals import StopSignals, exit_status

__all__ = [
    "DEFAULT_TIMEOUT",
    "TorchrunEnvironment",
    "is_primary_launcher",
    "launch",
    "resolve_launch_device",
    "torchrun_environment",
]

DEFAULT_TIMEOUT = timedelta(minutes=30)
# When a worker has exited with an error (or after a stop), the others get this long to end on
# their own before they are terminated (torch's ProcessContext.join grace period).
WORKER_EXIT_GRACE_S = 30.0

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchrunEnvironment:
    """This process's place in a job whose processes were started by torchrun (env://)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    machine_rank: int


def torchrun_environment() -> Optional[TorchrunEnvironment]:
    """The job described by torchrun's environment variables, or None outside such a job.

    Raises:
        ValueError: the variables are there but not integers.
    """
    if not all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        machine = int(os.environ.get("GROUP_RANK", rank // max(local_world, 1)))
    except ValueError as e:
        raise ValueError(f"torchrun environment variables are not integers: {e}") from None
    return TorchrunEnvironment(rank, world, local_rank, local_world, machine)


def is_primary_launcher(machine_rank: int = 0) -> bool:
    """Whether this process starts the job's first processes: rank 0 under torchrun, else the
    launcher of machine 0 (the one process of a job that takes job-wide actions before launch)."""
    env = torchrun_environment()
    return env.rank == 0 if env is not None else machine_rank == 0


def resolve_launch_device(device: Optional[str] = None) -> str:
    """``"cuda"`` or ``"cpu"``: ``device`` if given (a ``MODEL.DEVICE`` value such as ``"cuda:0"``
    counts as ``"cuda"``), else ``"cuda"`` exactly when a GPU is available."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(device).split(":")[0]
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"launch(device=...) must be 'cuda' or 'cpu', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("launch(device='cuda') but no CUDA GPU is available; use device='cpu'")
    return kind


@dataclass(frozen=True)
class _HostedStore:
    """The launcher's TCPStore, which the workers join as clients."""

    host: str
    port: int


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: Optional[str] = None,
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each machine.

    Args:
        main_func: called as ``main_func(*args)`` in every process (must be picklable: a
            module-level function).
        num_gpus_per_machine: processes per machine; one per GPU on GPUs, any number on the CPU.
        num_machines, machine_rank: the job's machine count and this machine's rank.
        dist_url: rendezvous URL of machine 0, e.g. ``"tcp://10.0.0.1:29500"``; ``"auto"`` (or
            None) with one machine: a port the OS picks (see the module docstring).
        timeout: timeout of collective operations.
        device: ``"cuda"`` (NCCL, one GPU per process), ``"cpu"`` (gloo) or None (``"cuda"`` when
            a GPU is available).

    With one process in total, ``main_func`` runs in the calling process. Under torchrun
    (:func:`torchrun_environment`) it runs in the calling process too, as the rank torchrun
    gave it; the process counts and ``dist_url`` are then torchrun's, these arguments are ignored.
    """
    env = torchrun_environment()
    if env is not None:
        return _run_in_torchrun_process(main_func, env, tuple(args), timeout, device)
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"launch needs at least one process: num_gpus_per_machine={num_gpus_per_machine}, "
            f"num_machines={num_machines}"
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    device = resolve_launch_device(device)
    if device == "cuda" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"{num_gpus_per_machine} processes per machine on CUDA, but only "
            f"{torch.cuda.device_count()} GPU(s) are visible; pass device='cpu' for CPU processes"
        )
    store = None
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError(
                "dist_url='auto' is only supported with one machine: pass machine 0's "
                "tcp://<address>:<port>"
            )
        # The OS picks the port while binding it: no race with other runs for a free port.
        store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timeout, wait_for_workers=False)
        rendezvous: Union[str, _HostedStore] = _HostedStore("127.0.0.1", store.port)
    else:
        rendezvous = dist_url
        if num_machines > 1 and dist_url.startswith("file://"):
            logger.warning("file:// is unreliable with several machines: use tcp://")
    pids: List[int] = []
    with StopSignals(forward_to=lambda: pids) as stop:
        context = mp.start_processes(
            _distributed_worker,
            nprocs=num_gpus_per_machine,
            args=(
                main_func,
                world_size,
                num_gpus_per_machine,
                machine_rank,
                rendezvous,
                tuple(args),
                timeout,
                device,
                os.getpid(),
            ),
            join=False,
            daemon=False,
            start_method="spawn",
        )
        pids.extend(context.pids())
        if stop.received is not None:  # arrived while the workers were being started
            stop.forward(stop.received)
        while not context.join(grace_period=WORKER_EXIT_GRACE_S):
            pass
    del store  # the workers are done with it


def _init_process_group(
    device: str,
    rendezvous: Union[str, _HostedStore],
    world_size: int,
    rank: int,
    timeout: timedelta,
) -> None:
    backend = "NCCL" if device == "cuda" else "GLOO"
    try:
        if isinstance(rendezvous, _HostedStore):
            store = dist.TCPStore(
                rendezvous.host, rendezvous.port, world_size, False, timeout=timeout
            )
            dist.init_process_group(
                backend=backend, store=store, world_size=world_size, rank=rank, timeout=timeout
            )
        else:
            dist.init_process_group(
                backend=backend,
                init_method=rendezvous,
                world_size=world_size,
                rank=rank,
                timeout=timeout,
            )
    except Exception:
        logger.error("Process group rendezvous: {}".format(rendezvous))
        raise


def _set_local_process_group(machine_of_rank: Sequence[int], machine_rank: int) -> None:
    """The group of ranks on this machine, as detectron2's comm.get_local_rank() expects.
    Every process creates every machine's group, in the same order."""
    for machine in sorted(set(machine_of_rank)):
        ranks = [r for r, m in enumerate(machine_of_rank) if m == machine]
        group = dist.new_group(ranks)
        if machine == machine_rank:
            compat.set_local_process_group(group)


def _run_main(main_func: Callable, args: tuple):
    # A barrier right after init avoids a possible timeout of the first collective
    # (facebookresearch/maskrcnn-benchmark#172).
    comm.synchronize()
    try:
        main_func(*args)
    except KeyboardInterrupt:
        # torch's spawn wrapper would report a worker stopped by SIGINT as successful (status 0)
        sys.exit(exit_status(2))
    finally:
        dist.destroy_process_group()


def _distributed_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    rendezvous: Union[str, _HostedStore],
    args: tuple,
    timeout: timedelta,
    device: str,
    launcher_pid: int,
):
    exit_with_parent(launcher_pid)
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N processes on one machine: share the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    _init_process_group(device, rendezvous, world_size, global_rank, timeout)
    _set_local_process_group([r // num_gpus_per_machine for r in range(world_size)], machine_rank)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    _run_main(main_func, args)


def _run_in_torchrun_process(
    main_func: Callable,
    env: TorchrunEnvironment,
    args: tuple,
    timeout: timedelta,
    device: Optional[str],
):
    exit_with_parent(os.getppid())  # torchrun's agent
    if env.world_size == 1:
        return main_func(*args)
    device = resolve_launch_device(device)
    if device == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible; pass device='cpu' (MODEL.DEVICE cpu) for CPU processes"
            )
        torch.cuda.set_device(env.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))
    _init_process_group(device, "env://", env.world_size, env.rank, timeout)
    machine_of_rank = [None] * env.world_size
    dist.all_gather_object(machine_of_rank, env.machine_rank)
    _set_local_process_group(machine_of_rank, env.machine_rank)
    _run_main(main_func, args)
