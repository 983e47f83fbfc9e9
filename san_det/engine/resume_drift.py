"""Resuming with another batch, process count or learning rate than the checkpoint's run: a
warning naming the old and new value and what the resumed run continues with.

Every checkpoint of :class:`~san_det.engine.trainer.RobustTrainer` records the run's shape
(:func:`run_shape`: ``SOLVER.IMS_PER_BATCH``, the number of processes, ``SOLVER.BASE_LR``).
``--resume`` with other values is allowed (a job moved to fewer GPUs, a batch that no longer fits)
but changes the run, so :func:`resume_drift_warnings` says how:

- ``SOLVER.IMS_PER_BATCH``: the iteration schedule (``MAX_ITER``, ``STEPS``) continues at the
  next iteration, but the data stream (:mod:`.loader`, a function of the iteration and the total
  batch) is read from ``iteration x new batch`` where the old run had read ``iteration x old
  batch`` images: images are skipped or seen again.
- The number of processes: the same total batch and data stream, another batch per process
  (batch statistics and per-process running state differ: close to, not bit-identical with, an
  uninterrupted run).
- ``SOLVER.BASE_LR``: the optimizer and scheduler state come from the checkpoint, so the rate the
  resumed run uses is reported as it is after loading (the checkpoint's, for detectron2's
  schedulers).
"""

from typing import Dict, List, Optional

__all__ = ["RUN_SHAPE_KEY", "resume_drift_warnings", "run_shape"]

#: Entry of the trainer's checkpoint state holding :func:`run_shape`.
RUN_SHAPE_KEY = "run_shape"


def run_shape(cfg, world_size: int) -> Dict:
    """What a resumed run must match to continue exactly."""
    return {
        "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "num_processes": int(world_size),
        "base_lr": float(cfg.SOLVER.BASE_LR),
    }


def resume_drift_warnings(
    recorded: Optional[Dict], current: Dict, start_iter: int, max_iter: int, resumed_lr: float
) -> List[str]:
    """One line per value of ``current`` (:func:`run_shape`) that differs from the checkpoint's
    ``recorded`` one (none for a checkpoint without a record). ``resumed_lr``: the base rate of
    the optimizer after loading the checkpoint."""
    if not recorded:
        return []
    lines = []
    where = f"training continues at iteration {start_iter} of {max_iter}"
    old_batch, new_batch = recorded.get("ims_per_batch"), current["ims_per_batch"]
    if old_batch is not None and old_batch != new_batch:
        lines.append(
            f"Resuming with SOLVER.IMS_PER_BATCH {new_batch} (the checkpoint's run used "
            f"{old_batch}): {where} on the same iteration schedule (MAX_ITER, SOLVER.STEPS), "
            f"reading the data stream from image position {start_iter * new_batch} (= "
            f"{start_iter} x {new_batch}) where the previous run had reached "
            f"{start_iter * old_batch}: images are skipped or seen twice, and the result differs "
            "from an uninterrupted run"
        )
    old_procs, new_procs = recorded.get("num_processes"), current["num_processes"]
    if old_procs is not None and old_procs != new_procs:
        lines.append(_process_drift(old_procs, new_procs, old_batch or new_batch, new_batch, where))
    old_lr, new_lr = recorded.get("base_lr"), current["base_lr"]
    if old_lr is not None and old_lr != new_lr:
        if resumed_lr == new_lr:
            effect = f"the schedule continues from iteration {start_iter} with {new_lr}"
        else:
            effect = (
                f"the optimizer and scheduler state of the checkpoint keep base rate {resumed_lr}; "
                "to train on with another rate, start a new run from the checkpoint (MODEL.WEIGHTS "
                "<checkpoint>, without --resume)"
            )
        lines.append(
            f"Resuming with SOLVER.BASE_LR {new_lr} (the checkpoint's run used {old_lr}): "
            f"{where}; {effect}"
        )
    return lines


def _process_drift(old_procs: int, new_procs: int, old_batch: int, new_batch: int, where: str):
    per_process, was = new_batch // max(new_procs, 1), old_batch // max(old_procs, 1)
    return (
        f"Resuming with {new_procs} process(es) (the checkpoint's run used {old_procs}): "
        f"{where} with the same total batch SOLVER.IMS_PER_BATCH {new_batch} and data stream, "
        f"{per_process} images per process (was {was}): batch statistics differ, the result is "
        "close to but not bit-identical with an uninterrupted run"
    )
