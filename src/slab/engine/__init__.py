"""The training engine: one :class:`Trainer` for every task (classification, language modelling, detection).

A task (:class:`Task`) supplies the model, the data, ``loss(batch)``, evaluation and recalibration;
the trainer owns the rest: torchrun/DDP setup, AMP, gradient accumulation, one non-finite policy
decided across ranks, clipping, EMA, the LR and PRepBN schedules, checkpoints (every rank's RNG,
atomic, ``weights_only`` loading, exact mid-epoch resumption), ``metrics.jsonl`` and the progress bar.
"""
from .checkpoint import atomic_save, find_resume_checkpoint, load_checkpoint
from .distributed import DistInfo, setup_distributed, teardown_distributed
from .optim import LambdaSchedule, TimmSchedule, weight_decay_groups
from .task import Task
from .trainer import NonFiniteLossError, Trainer, TrainerArgs, TrainResult, autocast_context, seed_everything

__all__ = ["Trainer", "TrainerArgs", "TrainResult", "Task", "NonFiniteLossError", "autocast_context",
           "seed_everything", "weight_decay_groups", "LambdaSchedule", "TimmSchedule", "atomic_save",
           "load_checkpoint", "find_resume_checkpoint", "DistInfo", "setup_distributed", "teardown_distributed"]
