"""The training configuration: one dataclass, readable from YAML, overridable field by field."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError, did_you_mean
from ..files import load_yaml_file

__all__ = ["TrainConfig", "resolve_steps", "AMP_CHOICES"]

AMP_CHOICES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Lengths given as *step amounts* (``lr_warmup``, ``prepbn_warmup``, ``prepbn_transition``) accept
    an ``int`` (optimizer steps), a ``float`` in [0, 1] (fraction of the total steps) or a string
    ``"<n>ep"`` (epochs, e.g. ``"5ep"``). The PRepBN transition defaults to 0.8 of the run: an
    absolute length tuned for one batch size ends after training at another (the authors' users
    got NaN that way).

    ``batch_size`` is per process and per micro-batch: the global batch of one optimizer step is
    ``batch_size * grad_accum * world_size``. With ``lr_base_batch`` set, the learning rate is
    ``lr * global_batch / lr_base_batch`` (DeiT's ``5e-4 * batch / 512``).
    """

    # what
    model: str = "slab_deit_nano_patch4_28"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    img_size: int | None = None
    # how long
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    grad_accum: int = 1
    # optimizer and schedules
    opt: str = "adamw"
    lr: float = 1e-3
    lr_base_batch: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] | None = None
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    lr_warmup: int | float | str = 0.05
    prepbn_warmup: int | float | str = 0
    prepbn_transition: int | float | str = 0.8
    clip_grad: float | None = None
    # regularisation and augmentation
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    auto_augment: str | None = None
    reprob: float = 0.0
    color_jitter: float | None = None
    drop_path: float = 0.0
    augment: bool = True
    ema: bool = False
    ema_decay: float = 0.9998
    # precision and parallelism
    amp: str = "none"
    sync_bn: bool = False
    device: str | None = None
    num_workers: int | None = None
    threads: int = 0
    # bookkeeping
    seed: int = 0
    output: str | None = None
    resume: str | None = None
    eval_every: int = 0
    eval_batch_size: int | None = None
    eval_max_batches: int | None = None
    save_every: int = 0
    keep_last: int = 3
    log_every: int = 50
    progress: bool = True
    recalibrate_batches: int = 0
    stop_at_step: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the value and what is allowed."""
        if not isinstance(self.model_kwargs, dict):
            raise UserError(f"model_kwargs must be a mapping of model arguments like {{\"depth\": 4}}, got "
                            f"{type(self.model_kwargs).__name__} {self.model_kwargs!r}")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give the length of the run: max_steps (optimizer steps) or epochs")
        if self.max_steps is not None and int(self.max_steps) <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.epochs is not None and float(self.epochs) <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {self.batch_size}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive (or None for no clipping), got {self.clip_grad}")
        if self.resume not in (None, "auto") and not os.path.isfile(self.resume):
            raise ValueError(f"resume must be 'auto' or an existing checkpoint file, got {self.resume!r}")
        if self.resume is not None and self.output is None and self.resume == "auto":
            raise ValueError("resume='auto' looks for checkpoints in output: give output")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1, got {self.stop_at_step}")
        if not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")
        for name in ("lr_warmup", "prepbn_warmup", "prepbn_transition"):
            _check_amount(name, getattr(self, name))

    # --- conversions -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["betas"] is not None:
            d["betas"] = list(d["betas"])
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            named = ", ".join(f"{k!r}{did_you_mean(k, cls.field_names())}" for k in unknown)
            raise UserError(f"unknown training option(s) {named}; known: {', '.join(cls.field_names())}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Read ``path`` (a YAML mapping of field names), then apply ``overrides`` (None values ignored)."""
        d = load_yaml(path)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML config as a dict: a file path, or the name of a packaged config (``slab/configs/NAME.yaml``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        from importlib import resources
        name = path if path.endswith(".yaml") else path + ".yaml"
        packaged = resources.files("slab") / "configs" / os.path.basename(name)
        if not packaged.is_file():
            guess = did_you_mean(os.path.basename(path).removesuffix(".yaml"), list_configs())
            raise FileNotFoundError(f"config {path!r} is neither a file nor a packaged config{guess} "
                                    f"({', '.join(list_configs())})")
        return load_yaml_file(name, packaged.read_text())
    return load_yaml_file(path)


def list_configs() -> list[str]:
    from importlib import resources
    root = resources.files("slab") / "configs"
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _check_amount(name: str, value) -> None:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be steps (int), a fraction (float) or '<n>ep', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 steps, got {value}")
    elif isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value}: a float is a fraction of the total steps and must be in [0, 1]; "
                             f"give an int for a number of steps")
    elif isinstance(value, str):
        if not value.endswith("ep"):
            raise ValueError(f"{name}={value!r}: a string must be epochs like '5ep'")
        try:
            if float(value[:-2]) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a non-negative number of epochs like '5ep'") from None
    else:
        raise ValueError(f"{name} must be steps (int), a fraction (float) or '<n>ep', got {value!r}")


def resolve_steps(name: str, value, total_steps: int, steps_per_epoch: int) -> int:
    """An amount of ``int`` steps / ``float`` fraction of ``total_steps`` / ``'<n>ep'`` epochs, as steps."""
    _check_amount(name, value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value * total_steps)
    return int(round(float(value[:-2]) * steps_per_epoch))


def parse_amount(text: str) -> int | float | str:
    """CLI parsing of a step amount: ``'100'`` -> 100 steps, ``'0.8'`` -> fraction, ``'5ep'`` -> epochs."""
    text = text.strip()
    if text.endswith("ep"):
        return text
    try:
        return int(text)
    except ValueError:
        return float(text)
