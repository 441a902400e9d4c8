"""Ray Tune search over the two-phase training run.

Each trial is a TorchTrainer run (`train.make_trainer`) with one point of the
search space; metrics flow to Tune every epoch and ASHA stops poor trials
early on validation MAE. The best config and checkpoint go to the output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from ray import tune

from agepipe import storage
from agepipe.config import TrainSettings, TuneSettings, from_dict, to_dict
from agepipe.model import NETWORK_SHAPE_FIELDS
from agepipe.registry import Registry
from agepipe.train import (
    calibrate_run,
    export_checkpoint,
    make_trainer,
    prepare_run,
    with_absolute_paths,
    worker_cpus,
)
from agepipe.train_data import plan_dataset
from agepipe.train_loop import PLACEMENT_GROUP_ID

# A trial function only drives its TorchTrainer; the workers hold the CPUs.
TRIAL_DRIVER_CPUS = 0.01


SEARCH_SAMPLERS: Registry[Callable[[list], Any]] = Registry(
    "search_space sampler",
    {
        # Bounds as numbers: YAML reads 1e-4 (no dot) as a string.
        "uniform": lambda args: tune.uniform(*map(float, args)),
        "loguniform": lambda args: tune.loguniform(*map(float, args)),
        "randint": lambda args: tune.randint(*map(int, args)),
        "choice": tune.choice,
        "grid": tune.grid_search,
    },
)


def search_space(spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's param space from `{setting: {sampler: arguments}}` (`TuneSettings.search_space`):
    `uniform`, `loguniform` and `randint` take [low, high]; `choice` and `grid` the values (`grid` runs
    every value, in order, `num_samples` times over)."""
    searchable = {f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get("help")}
    space = {}
    for name, sampler in spec.items():
        if name not in searchable:
            raise ValueError(f"search_space: {name!r} is not a training setting that a flag sets")
        if not (isinstance(sampler, dict) and len(sampler) == 1 and isinstance(next(iter(sampler.values())), list)):
            raise ValueError(f"search_space: {name} needs one sampler with a list, got {sampler!r}")
        [(kind, arguments)] = sampler.items()
        space[name] = SEARCH_SAMPLERS.create(kind, arguments)
    return space


def trial_settings(base: TrainSettings, searched: dict[str, Any], output: str) -> TrainSettings:
    """The base settings with one trial's values of the searched settings, writing under `output`."""
    return dataclasses.replace(base, output=output, **searched)


TRAIN_RUN_ID = "train_run_id"


def trial_report_callback() -> Any:
    """Tune's report callback for a trial's TorchTrainer, passing on the Train run's id as well."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            tagged = [{**metrics[0], TRAIN_RUN_ID: run_context.run_id}, *metrics[1:]]
            super().after_report(run_context, tagged, checkpoint)

    return TrialReportCallback()


def release_train_run(train_run_id: str | None, placement_group_id: str | None) -> None:
    """Give back what a Train run holds on the cluster when Tune has killed its trial.

    The one place that reaches into Ray's private APIs, because no public one does this: a Train run
    registers its workers' resources with Ray Data's autoscaling coordinator and removes its workers'
    placement group on shutdown, but a trial that ASHA stops (at its last epoch too) is killed instead.
    Its reservation would then stay until it expires (3 minutes) and its placement group until Train's
    cleaner sees the run's controller dead, which it can only learn from the dashboard's State API:
    without a dashboard, never. On a 2-CPU machine the next trial would wait forever.
    """
    import ray.util
    from ray._raylet import PlacementGroupID
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
        TrainAutoscalingCoordinatorClient,
    )
    from ray.util.placement_group import PlacementGroup

    if train_run_id:  # the requester id Train's own scaling policy uses
        TrainAutoscalingCoordinatorClient(f"train-{train_run_id}").cancel_resource_request()
    if placement_group_id:
        group = PlacementGroup(PlacementGroupID.from_hex(placement_group_id))
        if ray.util.placement_group_table(group).get("state") != "REMOVED":
            ray.util.remove_placement_group(group)


def release_stopped_trials_callback() -> Any:
    """A Tune callback that gives back the cluster share of a trial that has ended (`release_train_run`)."""

    class ReleaseStoppedTrials(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.release(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.release(trial)

        @staticmethod
        def release(trial: Any) -> None:
            result = trial.last_result or {}
            release_train_run(result.get(TRAIN_RUN_ID), result.get(PLACEMENT_GROUP_ID))

    return ReleaseStoppedTrials()


def tune_trial(trial_config: dict[str, Any]) -> None:
    """Tune's function trainable: drive one TorchTrainer run and forward its reports to Tune.

    Its datasets are materialized first: on a small machine a finished trial's streaming datasets
    keep their share of Ray Data's CPU budget, and the next trial's reads would wait for it forever.
    """
    import ray.data
    import ray.tune

    ray.data.DataContext.get_current().enable_progress_bars = False  # as in the driver: epochs report progress
    base = from_dict(TrainSettings, trial_config["base"])
    context = ray.tune.get_context()
    trial_output = storage.join(trial_config["output"], "trials", context.get_trial_id())
    settings = trial_settings(base, trial_config["searched"], trial_output)
    plan, _ = plan_dataset(settings)
    trainer = make_trainer(
        settings, plan, trial_output, "ray_train", callbacks=[trial_report_callback()], materialize_train=True
    )
    trainer.fit()


def latest_trial_checkpoint(output: str, trial_id: str) -> Any:
    """A trial's last Ray Train checkpoint (its `model.pt` holds the trial's best weights).

    Tune gets only metrics from the trial's trainer; the checkpoints stay in the trial's storage.
    """
    import pyarrow.fs as pafs
    import ray.train

    fs, root = storage.resolve(storage.join(output, "trials", trial_id, "ray_train"))
    entries = fs.get_file_info(pafs.FileSelector(root))
    names = [i.path for i in entries if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    if not names:
        raise RuntimeError(f"trial {trial_id} left no checkpoint under {root}")
    return ray.train.Checkpoint(path=max(names), filesystem=fs)


def run_tune(settings: TuneSettings) -> dict[str, Any]:
    """Search, then write `best_config.json`, the best trial's `model.pt`, `metrics.csv` and `trials.csv`."""
    import ray
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = search_space(settings.search_space)  # a bad space is reported before Ray starts
    if settings.train.train_on_val:
        raise ValueError("tune ranks trials by validation MAE: leave out --train-on-val (it trains on those faces)")
    if settings.train.teacher:
        raise ValueError("tune does not distil: leave out --teacher (agepipe train distils, with the recipe found)")
    varied_shape = sorted(set(settings.search_space) & set(NETWORK_SHAPE_FIELDS))
    if settings.train.initial_checkpoint and varied_shape:
        raise ValueError(
            f"the search space varies {', '.join(varied_shape)}, which --initial-checkpoint fixes (its network "
            "is fine-tuned as it is): give a search space without them in --config"
        )
    base = with_absolute_paths(settings.train)
    prepare_run(base)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = base.num_workers * (base.cpus_per_worker or 1)
    max_concurrent = settings.max_concurrent_trials or max(1, int(cluster_cpus // (per_trial + 1)))
    if not base.cpus_per_worker:
        # Trials share the cluster; their drivers hold a sliver each, their workers the rest.
        share = worker_cpus(
            cluster_cpus, max_concurrent * base.num_workers, reserved=TRIAL_DRIVER_CPUS * max_concurrent
        )
        base = dataclasses.replace(base, cpus_per_worker=share)
    fs, path = storage.resolve(base.output)
    scheduler = ASHAScheduler(
        max_t=base.phase1_epochs + base.phase2_epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    tuner = tune.Tuner(
        tune.with_resources(tune_trial, {"CPU": TRIAL_DRIVER_CPUS}),
        param_space={"searched": space, "base": to_dict(base), "output": base.output},
        tune_config=tune.TuneConfig(
            metric="val_mae",
            mode="min",
            num_samples=settings.num_samples,
            scheduler=scheduler,
            # Seeded: the same trials for the same seed. The concurrency limit goes to the generator
            # itself: Tune ignores `max_concurrent_trials` when given a generator instance.
            search_alg=BasicVariantGenerator(random_state=base.seed, max_concurrent=max_concurrent),
        ),
        run_config=tune.RunConfig(
            name="ray_tune",
            storage_path=path,
            storage_filesystem=fs,
            # A trial whose driver dies with its node runs again; its TorchTrainer, re-made on the same
            # storage, resumes from the trial's last checkpoint.
            failure_config=tune.FailureConfig(max_failures=base.max_failures),
            callbacks=[release_stopped_trials_callback()],
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_mae", mode="min", scope="all")
    best_config = best.config["searched"]
    best_settings = trial_settings(base, best_config, base.output)
    summary = export_checkpoint(
        latest_trial_checkpoint(base.output, best.metrics["trial_id"]), best_settings, base.output
    )
    summary["calibration"] = calibrate_run(best_settings)
    storage.write_bytes(
        storage.join(base.output, "best_config.json"),
        json.dumps({"config": best_config, "val_mae": summary["best_val_mae"]}, indent=2).encode(),
    )
    # Each trial's best epoch; its training_iteration is that epoch's, so how far the trial ran comes from
    # its last result.
    trials = results.get_dataframe(filter_metric="val_mae", filter_mode="min")
    trials = trials.drop(columns=[TRAIN_RUN_ID, PLACEMENT_GROUP_ID], errors="ignore")  # bookkeeping, not results
    iterations_run = {r.metrics["trial_id"]: r.metrics["training_iteration"] for r in results if r.metrics}
    trials["iterations_run"] = trials["trial_id"].map(iterations_run)
    storage.write_bytes(storage.join(base.output, "trials.csv"), trials.to_csv(index=False).encode())
    return {"best_config": best_config, **summary, "trials": len(trials)}
