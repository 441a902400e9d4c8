"""The Ray Train worker: phases, epochs, early stopping, resume and the per-epoch report.

Phase 1 trains the heads on a frozen backbone; phase 2 unfreezes the top `unfreeze_stages` stages at its
own rate, ramped up over its first `warmup_epochs`. Every epoch ends in a checkpoint through Ray Train
(the run's state, and the best weights by validation MAE as `model.pt`), so a dead worker or an
interrupted run resumes where it was.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agepipe.augment import AUGMENTATIONS, image_transform, to_tensors
from agepipe.config import CropSettings, TrainSettings, from_dict
from agepipe.model import (
    AGE_HEADS,
    AgeModel,
    ModelConfig,
    age_estimate,
    checkpoint_dict,
    freeze_backbone,
    initial_state,
    set_train_mode,
    unwrap,
)
from agepipe.registry import Registry
from agepipe.train_data import AGE_WEIGHTINGS


def age_targets(ages: torch.Tensor, max_age: int, sigma: float) -> torch.Tensor:
    """Gaussian label distributions over 0..max_age centred on each age (label-distribution learning)."""
    support = torch.arange(max_age + 1, dtype=torch.float32, device=ages.device)
    logits = -((support[None, :] - ages[:, None]) ** 2) / (2 * sigma**2)
    return logits.softmax(-1)


def age_loss(
    outputs: dict[str, torch.Tensor],
    ages: torch.Tensor,
    config: ModelConfig,
    settings: TrainSettings,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The age head's loss toward `ages`: the mean over faces, weighted by `weights` (one per face) if given."""
    if config.age_head == "distribution":
        target = age_targets(ages, config.max_age, settings.label_sigma)
        predicted, _ = age_estimate(outputs["age"], config)
        per_face = -(target * outputs["age"].log_softmax(-1)).sum(-1) + 0.1 * (predicted - ages).abs()
    else:
        per_face = 0.1 * F.smooth_l1_loss(outputs["age"].squeeze(-1), ages, beta=2.0, reduction="none")
    return per_face.mean() if weights is None else (per_face * weights).mean()


def soft_cross_entropy(logits: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Cross-entropy toward a probability per class (a one-hot row gives the usual cross-entropy)."""
    return -(probabilities * logits.log_softmax(-1)).sum(-1).mean()


def distilled_losses(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], config: ModelConfig, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Age, group and gender losses each `teacher_weight` toward the teacher's predictions (`batch['teacher']`:
    age, group probabilities, gender probabilities) and the rest toward the labels; a face without a gender
    label learns its gender from the teacher alone."""
    weight = settings.teacher_weight
    groups = len(config.groups.names)
    teacher = batch["teacher"]
    age_weights = batch.get("age_weight")
    ages = (1 - weight) * age_loss(outputs, batch["age"], config, settings, age_weights) + weight * age_loss(
        outputs, teacher[:, 0], config, settings, age_weights
    )
    group_target = (1 - weight) * F.one_hot(batch["group"], groups) + weight * teacher[:, 1 : 1 + groups]
    known = batch["gender"] >= 0
    gender_target = teacher[:, 1 + groups :].clone()
    gender_target[known] = (1 - weight) * F.one_hot(batch["gender"][known], 2) + weight * gender_target[known]
    return (
        ages,
        soft_cross_entropy(outputs["group"], group_target),
        soft_cross_entropy(outputs["gender"], gender_target),
    )


def multitask_loss(
    model: AgeModel, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the three head losses (toward the labels, and the teacher where the batch has its
    predictions; each face's age loss weighted by the batch's `age_weight` where it has one), and the
    batch's predicted ages."""
    config = model.config
    predicted, _ = age_estimate(outputs["age"], config)
    if "teacher" in batch:
        ages, groups, genders = distilled_losses(outputs, batch, config, settings)
    else:
        ages = age_loss(outputs, batch["age"], config, settings, batch.get("age_weight"))
        groups = F.cross_entropy(outputs["group"], batch["group"])
        genders = masked_cross_entropy(outputs["gender"], batch["gender"])
    loss = settings.age_loss_weight * ages + settings.group_loss_weight * groups + settings.gender_loss_weight * genders
    return loss, predicted


# The dtype torch.autocast runs the network in, by `TrainSettings.precision`; None: float32 throughout.
PRECISIONS: Registry[torch.dtype | None] = Registry("precision", {"fp32": None, "bf16": torch.bfloat16})


def network_outputs(model: nn.Module, images: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """The network's outputs, as float32, from a forward pass in the precision's dtype (autocast; none for
    fp32); the weights, their gradients, the optimizer and the losses stay float32."""
    dtype = PRECISIONS[precision]
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(images)
    return {name: value.float() for name, value in outputs.items()}


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows with a label (target -1: none)."""
    known = target >= 0
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], target[known])


def phase_of(epoch: int, settings: TrainSettings) -> int:
    return 1 if epoch < settings.phase1_epochs else 2


def check_setting_names(settings: TrainSettings) -> None:
    """Refuse settings that name no registered head, augmentation, precision, schedule or weighting, before
    Ray starts rather than in the workers."""
    AGE_HEADS.check(settings.age_head)
    AUGMENTATIONS.check(settings.augmentation)
    PRECISIONS.check(settings.precision)
    LR_SCHEDULES.check(settings.lr_schedule)
    AGE_WEIGHTINGS.check(settings.age_weighting)


def model_config(settings: TrainSettings) -> ModelConfig:
    return ModelConfig(
        backbone=settings.backbone,
        pretrained=settings.pretrained,
        age_head=settings.age_head,
        max_age=int(settings.labels.max_age),
        dense_units=settings.dense_units,
        dropout=settings.dropout,
        image_size=settings.image_size,
        groups=settings.labels.groups,
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings, epochs: int) -> Any:
    """Cosine decay over the phase's epochs, to 1% of the starting rate."""
    start = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=start / 100)


def plateau_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings, epochs: int) -> Any:
    """Multiply the rate by `lr_factor` after `lr_patience` epochs without a better val MAE."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience
    )


LR_SCHEDULES = Registry("lr schedule", {"cosine": cosine_schedule, "plateau": plateau_schedule})


def step_schedule(scheduler: Any, val_mae: float) -> None:
    """Advance a per-epoch schedule; the plateau schedule needs the epoch's val MAE."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_mae)
    else:
        scheduler.step()


def warmup_schedule(optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """A linear ramp over the first `steps` optimizer steps up to the scheduled rate, or None for none.

    Adam's first updates move every weight by about the full rate, which wrecks freshly unfrozen
    pretrained features (the first fine-tuning epoch's loss rose above phase 1's). It multiplies
    whatever the epoch schedule sets, so it composes with either."""
    if steps <= 1:
        return None
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / steps, end_factor=1.0, total_iters=steps - 1)


class PhaseState:
    """Model, optimizer, epoch schedule and warm-up (per step) for one training phase."""

    def __init__(self, model: AgeModel, phase: int, settings: TrainSettings, warmup_steps: int = 0) -> None:
        import ray.train.torch

        freeze_backbone(model, 0 if phase == 1 else settings.unfreeze_stages, settings.freeze_batchnorm)
        self.phase = phase
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        trainable = [p for p in model.parameters() if p.requires_grad]
        lr = settings.phase1_lr if phase == 1 else settings.phase2_lr
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
        epochs = settings.phase1_epochs if phase == 1 else settings.phase2_epochs
        self.scheduler = LR_SCHEDULES.create(settings.lr_schedule, self.optimizer, settings, epochs)
        self.warmup = warmup_schedule(self.optimizer, warmup_steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "warmup": None if self.warmup is None else self.warmup.state_dict(),
        }

    def resume(self, saved: dict[str, Any]) -> None:
        """Continue a phase from a checkpoint's `state_dict()`; a warm-up it did not record had ended."""
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("warmup") is None:
            self.warmup = None
        elif self.warmup is not None:
            self.warmup.load_state_dict(saved["warmup"])


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    # On the training device: NCCL, the GPU process group's backend, reduces CUDA tensors only.
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class EpochTotals:
    """An epoch's sums over its batches, then over all workers, and the metrics they give."""

    rows: float = 0.0
    loss: float = 0.0  # each batch's mean loss times its rows
    abs_error: float = 0.0
    group_correct: float = 0.0
    gender_known: float = 0.0  # rows with a gender label
    gender_correct: float = 0.0

    def add(self, loss: torch.Tensor, predicted: torch.Tensor, outputs: dict, batch: dict) -> None:
        n = len(batch["age"])
        known = batch["gender"] >= 0
        self.loss += loss.item() * n
        self.abs_error += (predicted.detach() - batch["age"]).abs().sum().item()
        self.group_correct += (outputs["group"].argmax(-1) == batch["group"]).sum().item()
        self.gender_correct += (outputs["gender"].argmax(-1)[known] == batch["gender"][known]).sum().item()
        self.gender_known += known.sum().item()
        self.rows += n

    def all_reduced(self, device: torch.device) -> EpochTotals:
        names = [f.name for f in fields(self)]
        return EpochTotals(**dict(zip(names, _all_reduce_sum([getattr(self, n) for n in names], device), strict=True)))

    def metrics(self) -> dict[str, float]:
        rows = max(self.rows, 1)
        return {
            "loss": self.loss / rows,
            "mae": self.abs_error / rows,
            "group_accuracy": self.group_correct / rows,
            "gender_accuracy": self.gender_correct / max(self.gender_known, 1),
            "rows": int(rows),
        }


def run_epoch(
    state: PhaseState,
    shard: Any,
    settings: TrainSettings,
    train: bool,
    device: torch.device,
    age_weights: torch.Tensor,
) -> dict:
    """One pass over a data shard; metrics summed over all workers. `age_weights` (one per year of age,
    `train_data.age_loss_weights`) weigh each face's age loss by its labelled age."""
    model = unwrap(state.model)
    transform = image_transform(settings.image_size, train, settings.augmentation)
    totals = EpochTotals()
    if train:
        set_train_mode(model)
    else:
        model.eval()
    batches = shard.iter_batches(
        batch_size=settings.batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * settings.batch_size if train else None,
        local_shuffle_seed=settings.seed if train else None,
    )
    for raw in batches:
        batch = {k: v.to(device) for k, v in to_tensors(raw, transform, model.config.groups).items()}
        batch["age_weight"] = age_weights[batch["age"].round().long().clamp(0, len(age_weights) - 1)]
        with torch.set_grad_enabled(train):
            # Validation runs in float32 as scoring does, so the best epoch is chosen on the numbers users get.
            outputs = network_outputs(state.model, batch["image"], settings.precision if train else "fp32")
            loss, predicted = multitask_loss(model, outputs, batch, settings)
        if train:
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            if state.warmup is not None:
                state.warmup.step()
        totals.add(loss, predicted, outputs, batch)
    return totals.all_reduced(device).metrics()


@dataclass
class BestEpoch:
    """The best epoch so far by validation MAE, its weights, and the epochs since it (early stopping,
    counted within a phase)."""

    val_mae: float = math.inf
    epoch: int = -1
    state_dict: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def update(self, epoch: int, val_mae: float, model: AgeModel) -> None:
        if val_mae < self.val_mae:
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.val_mae, self.epoch, self.state_dict, self.stale = val_mae, epoch, weights, 0
        else:
            self.stale += 1

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RunState:
    """Where a run stands after its last checkpoint: a fresh run when there is none."""

    next_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)
    weights: dict[str, torch.Tensor] | None = None
    phase: dict[str, Any] | None = None  # PhaseState.state_dict() of the phase it was in

    @classmethod
    def from_checkpoint(cls, checkpoint: Any) -> RunState:
        if checkpoint is None:
            return cls()
        with checkpoint.as_directory() as directory:
            saved = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        phase = {k: saved.get(k) for k in ("phase", "optimizer", "scheduler", "warmup")}
        return cls(saved["epoch"] + 1, saved["history"], BestEpoch(**saved["best"]), saved["state_dict"], phase)


def warmup_steps(epoch: int, settings: TrainSettings, steps_per_epoch: int) -> int:
    """Warm-up steps for a phase that starts at `epoch`: phase 2's first `warmup_epochs`, else none."""
    return math.ceil(steps_per_epoch * settings.warmup_epochs) if epoch == settings.phase1_epochs else 0


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function; `config` holds the settings and the crop settings as dicts."""
    import ray.train
    import ray.train.torch

    settings = from_dict(TrainSettings, config["settings"])
    crop = from_dict(CropSettings, config["crop"])
    torch.manual_seed(settings.seed)
    if not settings.use_gpu:
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device()
    network = model_config(settings)
    model = AgeModel(network, backbone_weights=settings.initial_checkpoint is None)
    if settings.initial_checkpoint:
        model.load_state_dict(initial_state(settings.initial_checkpoint, network))
    elif settings.age_head == "regression":
        # Start at the training split's mean age, so phase 1 need not spend its epoch moving a bias there.
        torch.nn.init.constant_(model.age_head.bias, float(config.get("mean_train_age", 0.0)))
    model = model.to(memory_format=torch.channels_last)
    run = RunState.from_checkpoint(ray.train.get_checkpoint())
    if run.weights is not None:
        model.load_state_dict(run.weights)
    state = None
    age_weights = torch.tensor(config["age_weights"], dtype=torch.float32, device=device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(run.next_epoch, settings.phase1_epochs + settings.phase2_epochs):
        phase = phase_of(epoch, settings)
        if epoch == settings.phase1_epochs:
            run.best.stale = 0  # early stopping counts within a phase
        if phase == 2 and run.best.stale >= settings.patience:
            break
        if state is None or state.phase != phase:
            # The previous phase's DDP wrapper must be gone before the next one hooks the same
            # parameters, or its gradient hooks would still fire.
            state = None
            gc.collect()
            state = PhaseState(model, phase, settings, warmup_steps(epoch, settings, config["train_steps_per_epoch"]))
            if run.phase is not None and run.phase["phase"] == phase:
                state.resume(run.phase)
            run.phase = None
        started = time.perf_counter()
        train_metrics = run_epoch(state, train_shard, settings, True, device, age_weights)
        seconds = time.perf_counter() - started
        val_metrics = run_epoch(state, val_shard, settings, False, device, age_weights)
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this epoch ended at
        step_schedule(state.scheduler, val_metrics["mae"])
        run.best.update(epoch, val_metrics["mae"], model)
        metrics = {
            "epoch": epoch,
            "phase": phase,
            "train_loss": train_metrics["loss"],
            "train_mae": train_metrics["mae"],
            "val_loss": val_metrics["loss"],
            "val_mae": val_metrics["mae"],
            "val_group_accuracy": val_metrics["group_accuracy"],
            "val_gender_accuracy": val_metrics["gender_accuracy"],
            "lr": lr,
            "train_images_per_s": train_metrics["rows"] / seconds,
            "best_val_mae": run.best.val_mae,
        }
        run.history.append(metrics)
        _report(epoch, metrics, model, state, run, crop)


# Reported with rank 0's metrics (not kept in the history): the worker group's placement group, so
# that Tune can give it back when it stops a trial (Train's own cleaner needs the dashboard's State API).
PLACEMENT_GROUP_ID = "placement_group_id"


def _report(epoch: int, metrics: dict, model: AgeModel, state: PhaseState, run: RunState, crop: CropSettings) -> None:
    """Report an epoch's metrics to Ray Train; rank 0 adds the checkpoint: the run's state and the best
    weights as `model.pt`."""
    import ray.train
    import ray.util

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        saved = {"epoch": epoch, "state_dict": model.state_dict(), "best": run.best.as_dict(), "history": run.history}
        torch.save({**saved, **state.state_dict()}, os.path.join(directory, "state.pt"))
        final = checkpoint_dict(model, crop, {"val_mae": run.best.val_mae, "epoch": run.best.epoch})
        if run.best.state_dict is not None:
            final["state_dict"] = run.best.state_dict
        torch.save(final, os.path.join(directory, "model.pt"))
        group = ray.util.get_current_placement_group()
        if group is not None:
            metrics = {**metrics, PLACEMENT_GROUP_ID: group.id.hex()}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
