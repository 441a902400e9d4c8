"""`agepipe <stage>`: the command line. It parses arguments and calls the library.

tyro builds each command's flags from its settings dataclass in `config`: the help from the fields,
their defaults shown. tyro rather than jsonargparse (both tried): tyro flattens nested settings into the
flags the design's contracts name (`--detector`, `--labels`, `--batch-size`; jsonargparse gives
`--crop.detector`, `--labels.kind`, `--batch_size` and no help from the fields), and takes a default
instance, which is how a `--config` YAML file sits between the defaults and the flags.
"""

from __future__ import annotations

import dataclasses
import logging
import pkgutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

import tyro
import yaml

from agepipe import config, storage
from agepipe.cluster import ClusterUnreachable, quiet_ray_data_failures
from agepipe.config import setting
from agepipe.storage import StorageError, StorageUnavailable

DESCRIPTION = "Facial age estimation at scale on Ray."
# Flags that changed with the move to tyro: each is refused with the flag that does the same now.
RENAMED_FLAGS = {"--train-batchnorm": "--no-freeze-batchnorm", "--largest-face-only": "--no-all-faces"}
TYRO_MARKERS = (tyro.conf.OmitArgPrefixes,)  # a nested dataclass's flags are the command's own

SettingsT = TypeVar("SettingsT")


@dataclass
class CommonOptions:
    """The options of every command."""

    config: str | None = setting(None, help="YAML file of settings (the flags given override it)")
    debug: bool = setting(False, help="on a failure, the full traceback, not one line")


@dataclass
class Invocation(Generic[SettingsT]):
    """A command's settings and the options every command has."""

    settings: SettingsT
    common: CommonOptions = field(default_factory=CommonOptions)


def job_line(summary: Any, title: str) -> str:
    """A crop or scoring job's summary and the storage retries it needed."""
    return f"{summary.render(title)}; {storage.retries_needed()} storage retries"


def evaluate_line(result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    mae = f", MAE {metrics['age']['mae']:.2f} years" if metrics and metrics["age"]["mae"] is not None else ""
    return f"evaluate: {result['coverage']['faces']} faces{mae}; report at {result['report']}"


def export_model(settings: config.ExportSettings) -> str:
    """`agepipe export`: a shareable checkpoint, calibrated where it can be."""
    from agepipe.model import export_for_sharing

    crop = export_for_sharing(list(settings.model), settings.output, half=not settings.full_precision)
    what = f"an ensemble of {len(settings.model)} models" if len(settings.model) > 1 else "the model"
    calibration = calibrate_export(settings.output, settings.calibration_data)
    return f"export: wrote {what} to {settings.output} (crop settings {crop})\nexport: {calibration}"


def calibrate_export(output: str, data: str | None) -> str:
    """Give an exported checkpoint a calibration where it has none (an ensemble never has): fitted on `data`,
    else on the dataset its networks record training on; a warning where there is neither."""
    from agepipe.calibrate import Calibration, calibrate_checkpoint, describe, recorded_data
    from agepipe.model import read_checkpoint

    checkpoint = read_checkpoint(output)
    if checkpoint.get("calibration") and not data:
        return f"kept the model's {describe(Calibration.from_dict(checkpoint['calibration']))}"
    data = data or recorded_data(checkpoint)
    if not data:
        logging.getLogger(__name__).warning(
            "%s has no calibration: its age intervals are null until `agepipe calibrate --model %s --data FACES`",
            output,
            output,
        )
        return "no calibration (no --calibration-data, and the networks' training data is not here)"
    return describe(calibrate_checkpoint(output, data))


def demo_lines(result: dict[str, Any]) -> str:
    return f"\n{result['summary'].render('score')}\n\n{result['faces']}\n\nreport: {result['report']}"


# A command: its settings (and so its flags), the library function that runs it (as "module:function", imported
# only when the command runs: most import PyTorch, which `agepipe crop` and `--help` need not wait for), and
# the line printed from what that function returns.
COMMANDS: dict[str, tuple[type, str | Callable[[Any], Any], Callable[[Any], str] | None]] = {
    "crop": (config.CropJobSettings, "agepipe.crop:run_crop", lambda summary: job_line(summary, "crop")),
    "score": (config.ScoreSettings, "agepipe.score:run_score", lambda summary: job_line(summary, "score")),
    "train": (config.TrainSettings, "agepipe.train:run_training", lambda result: f"train: {result}"),
    "evaluate": (config.EvaluateSettings, "agepipe.evaluate:run_evaluate", evaluate_line),
    "tune": (config.TuneSettings, "agepipe.tune:run_tune", lambda result: f"tune: {result}"),
    "calibrate": (config.CalibrateSettings, "agepipe.calibrate:run_calibrate", str),
    "card": (config.CardSettings, "agepipe.card:write_card", lambda written: f"card: {written}"),
    "serve": (config.ServeSettings, "agepipe.serve:run_server", None),
    "export": (config.ExportSettings, export_model, str),
    "demo": (config.DemoSettings, "agepipe.demo:run_demo", demo_lines),
}


def _missing_where_required(settings: Any) -> Any:
    """`settings` with each required field that nothing set marked as tyro's MISSING, nested ones too:
    the command line then asks for it."""
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            _missing_where_required(value)
        elif item.metadata.get("required") and value == item.default:
            setattr(settings, item.name, tyro.MISSING)
    return settings


def refuse(command: str, reason: str) -> NoReturn:
    """End a command whose arguments are wrong, as tyro does: the reason on one line, status 2."""
    print(f"agepipe {command}: error: {reason}", file=sys.stderr)
    raise SystemExit(2)


def parse(argv: Sequence[str]) -> tuple[str, Invocation]:
    """The command named first in `argv` and its settings: the dataclass defaults, then the `--config`
    file's, then the flags given: the same order for every command."""
    if not argv or argv[0] not in COMMANDS:  # the commands' list, or tyro's error that names them
        commands = {name: settings for name, (settings, _, _) in COMMANDS.items()}
        tyro.extras.subcommand_cli_from_dict(commands, prog="agepipe", description=DESCRIPTION, args=argv)
    command, flags = argv[0], list(argv[1:])
    for old, new in RENAMED_FLAGS.items():
        if old in flags:
            refuse(command, f"{old} is now {new}")
    cls = COMMANDS[command][0]
    without_help = [flag for flag in flags if flag not in ("-h", "--help")]
    common, _ = tyro.cli(CommonOptions, args=without_help, return_unknown_args=True, add_help=False)
    try:
        loaded = config.load(cls, common.config)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:  # no such file, or not these settings
        refuse(command, str(exc))
    defaults = Invocation(_missing_where_required(loaded), common)
    prog = f"agepipe {command}"
    invocation = tyro.cli(
        Invocation[cls], args=flags, default=defaults, prog=prog, description=cls.__doc__, config=TYRO_MARKERS
    )
    return command, invocation


def setting_values(settings: Any) -> Iterator[Any]:
    """Every value of a settings dataclass, those of the settings nested in it too."""
    for value in vars(settings).values():
        if dataclasses.is_dataclass(value):
            yield from setting_values(value)
        else:
            yield value


def remote_uris(settings: Any) -> list[str]:
    """The storage URIs a command was given (its inputs, outputs and model), for naming in a failure."""
    return [str(v) for v in setting_values(settings) if isinstance(v, str) and storage.is_remote(v)]


def failure_line(command: str, exc: Exception, uris: Sequence[str]) -> tuple[int, str | None]:
    """Exit status and the one line that reports a failure a user can act on; no line for a bug.

    An outage (or a wrong endpoint) is status 3: the same command run again resumes. Bad arguments,
    missing or denied locations are status 2."""
    outage = storage.outage_in(exc)
    if outage is not None:
        if isinstance(outage, StorageUnavailable):
            what = str(outage)
        else:
            where = ", ".join(uris) or "its storage"
            what = f"{storage.store_of(uris[0] if uris else '')} did not answer for {where}: {storage.reason(outage)}"
        return 3, (
            f"agepipe {command}: storage unavailable: {what.rstrip('.')}. Nothing written is lost: "
            f"run the same command again to resume once the store answers"
        )
    if isinstance(exc, ValueError | StorageError | FileNotFoundError | PermissionError | ClusterUnreachable):
        return 2, f"agepipe {command}: error: {exc}"
    return 1, None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command, invocation = parse(list(sys.argv[1:] if argv is None else argv))
    debug = invocation.common.debug
    if command in ("crop", "score") and not debug:
        quiet_ray_data_failures()
    _, target, describe = COMMANDS[command]
    try:
        run = target if callable(target) else pkgutil.resolve_name(target)
        result = run(invocation.settings)
        if describe is not None:
            print(describe(result))
        return 0
    except Exception as exc:
        if debug:
            raise
        status, line = failure_line(command, exc, remote_uris(invocation.settings))
        if not line:
            raise
        storage.retries_needed()  # ends the job's retry counter, which would outlive it on a cluster
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
