"""``launch``: detectron2's multi-process launcher, also for CPU-only machines (gloo backend).

detectron2 0.6's ``launch`` asserts CUDA and hard-codes NCCL. This one has the same signature and,
on GPUs, the same behaviour (one process per GPU, NCCL). Without a GPU, or with ``device="cpu"``,
it starts the same number of CPU processes that talk through gloo, as upstream detectron2 later
does: ``--num-gpus N`` on a machine without GPUs trains with N data-parallel CPU processes.
"""

import logging
import os
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "resolve_launch_device"]

DEFAULT_TIMEOUT = timedelta(minutes=30)

logger = logging.getLogger(__name__)


def _find_free_port() -> int:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))  # the OS picks a free port
    port = sock.getsockname()[1]
    sock.close()
    return port


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
        dist_url: rendezvous URL, e.g. ``"tcp://127.0.0.1:8686"``; ``"auto"`` (or None with one
            machine) picks a free local port.
        timeout: timeout of collective operations.
        device: ``"cuda"`` (NCCL, one GPU per process), ``"cpu"`` (gloo) or None (``"cuda"`` when
            a GPU is available).

    With one process in total, ``main_func`` runs in the calling process.
    """
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
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' is only supported with one machine")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://")
    mp.spawn(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            tuple(args),
            timeout,
            device,
        ),
        daemon=False,
    )


def _distributed_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
    device: str,
):
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N processes on one machine: share the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    try:
        dist.init_process_group(
            backend="NCCL" if device == "cuda" else "GLOO",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Process group URL: {}".format(dist_url))
        raise

    # The group of ranks on this machine, as detectron2's comm.get_local_rank() expects.
    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("comm._LOCAL_PROCESS_GROUP is already set in a fresh worker")
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group

    if device == "cuda":
        torch.cuda.set_device(local_rank)
    # A barrier right after init avoids a possible timeout of the first collective
    # (facebookresearch/maskrcnn-benchmark#172).
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
