"""`agepipe <stage>`: the command line. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from agepipe import config, storage
from agepipe.cluster import ClusterUnreachable, quiet_ray_data_failures
from agepipe.storage import StorageError, StorageUnavailable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def register(run: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = (add_arguments, run)
        return run

    return register


def _choices(spec: str | tuple[str, ...] | None) -> list[str] | None:
    """A field's choices: a tuple, or the keys of a registry named "module:NAME"."""
    if spec is None or isinstance(spec, tuple):
        return None if spec is None else list(spec)
    module, name = spec.split(":")
    return sorted(getattr(importlib.import_module(module), name))


def _flag_type(hint: Any) -> type:
    """int, float, str or bool from a field's annotation (`int | None` gives int)."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0]


def _help(field: dataclasses.Field, kind: type, overridden: dict | None) -> str:
    """The field's help and its default; for a model's crop overrides, the override's default or the
    model's own setting."""
    text = field.metadata["help"]
    default = field.default
    if overridden is not None:
        if field.name not in overridden:
            return f"{text} (default: as the model's checkpoint records it)"
        default = overridden[field.name]
    if kind is bool:
        shown = "off" if default is field.metadata["negate"] else "on"
        return f"{text} (default: {shown})" if default is not None else text
    if default in (None, "", dataclasses.MISSING) or field.metadata["required"]:
        return text
    return f"{text} (default: {default})"


def _own_flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def flag_for(field: dataclasses.Field, value: Any) -> str:
    """The command-line text that sets `field` to `value` (what `add_setting_flags` parses)."""
    name = field.metadata["flag"] or _own_flag(field)
    if not isinstance(value, bool):
        return f"{name} {value}"
    if field.metadata["negate"]:
        return name if value is False else _own_flag(field)
    return name if value else "--no-" + name[2:]


def add_setting_flags(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", *, overridden: dict | None = None
) -> None:
    """One flag per `config.setting` field of `cls` and of the settings nested in it; each flag's dest
    is the field's dotted key (`crop.margin`, `crop_overrides.margin`), set only where it is given.
    `overridden` (a crop_overrides dict's default) marks CropSettings flags that override a model's."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        nested = field.metadata.get("flags")
        if nested == "fields":
            add_setting_flags(parser, hints[field.name], f"{prefix}{field.name}.")
            continue
        if nested == "crop":
            add_setting_flags(parser, config.CropSettings, f"{prefix}{field.name}.", overridden=field.default_factory())
            continue
        if "help" not in field.metadata or (field.metadata["crop_job_only"] and overridden is not None):
            continue
        kind = _flag_type(hints[field.name])
        name = field.metadata["flag"] or _own_flag(field)
        options: dict[str, Any] = {"dest": prefix + field.name, "help": _help(field, kind, overridden)}
        if field.metadata["required"]:
            options["required"] = True
        if kind is bool and field.metadata["negate"]:
            # The flag sets the field False; the field's own name, the opposite.
            parser.add_argument(name, action="store_const", const=False, **options)
            plain = {"dest": options["dest"], "help": "the opposite of " + name}
            parser.add_argument(_own_flag(field), action="store_const", const=True, **plain)
            continue
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            none_word = field.metadata["none_word"]
            options["type"] = lambda v, t=kind, w=none_word: None if v == w else t(v)
            choices = _choices(field.metadata["choices"])
            if choices:
                options["choices"] = choices
            else:
                options["metavar"] = kind.__name__.upper()
        parser.add_argument(name, **options)


def settings_from_args(cls: type[config.T], args: argparse.Namespace) -> config.T:
    """Defaults, then `--config` YAML, then the flags given: the same order for every command."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug")}
    return config.apply_overrides(config.load(cls, getattr(args, "config", None)), given, skip_none=False)


def job_line(summary: Any, title: str) -> str:
    """A crop or scoring job's summary and the storage retries it needed."""
    return f"{summary.render(title)}; {storage.retries_needed()} storage retries"


def evaluate_line(result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    mae = f", MAE {metrics['age']['mae']:.2f} years" if metrics and metrics["age"]["mae"] is not None else ""
    return f"evaluate: {result['coverage']['faces']} faces{mae}; report at {result['report']}"


# A pipeline command: its settings (and so its flags), the library function that runs it ("module:name",
# imported only when the command runs), and the line printed from what that function returns.
SETTINGS_COMMANDS: dict[str, tuple[type, str, Callable[[Any], str] | None]] = {
    "crop": (config.CropJobSettings, "agepipe.crop:run_crop", lambda summary: job_line(summary, "crop")),
    "score": (config.ScoreSettings, "agepipe.score:run_score", lambda summary: job_line(summary, "score")),
    "train": (config.TrainSettings, "agepipe.train:run_training", lambda result: f"train: {result}"),
    "evaluate": (config.EvaluateSettings, "agepipe.evaluate:run_evaluate", evaluate_line),
    "tune": (config.TuneSettings, "agepipe.tune:run_tune", lambda result: f"tune: {result}"),
    "calibrate": (config.CalibrateSettings, "agepipe.calibrate:run_calibrate", str),
    "card": (config.CardSettings, "agepipe.card:write_card", lambda written: f"card: {written}"),
    "serve": (config.ServeSettings, "agepipe.serve:run_server", None),
}


def run_settings_command(name: str, args: argparse.Namespace) -> int:
    cls, target, describe = SETTINGS_COMMANDS[name]
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(settings_from_args(cls, args))
    if describe is not None:
        print(describe(result))
    return 0


for _name, (_cls, _, _) in SETTINGS_COMMANDS.items():
    COMMANDS[_name] = (
        lambda parser, cls=_cls: add_setting_flags(parser, cls),
        lambda args, name=_name: run_settings_command(name, args),
    )


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="checkpoint to export (path or URI); several, trained on the same crops with one model config, "
        "are exported as one ensemble that scores with the mean of their ages and probabilities",
    )
    parser.add_argument("--output", required=True, help="where to write the shareable checkpoint")
    parser.add_argument(
        "--full-precision", action="store_true", default=False, help="keep float32 weights (default fp16)"
    )
    parser.add_argument(
        "--calibration-data",
        help="crop dataset with labels to calibrate the age intervals on (`agepipe calibrate --data`); unset: the "
        "one the networks record training on, where it exists",
    )


@command("export", add_export_arguments)
def run_export_command(args: argparse.Namespace) -> int:
    from agepipe.model import export_for_sharing

    crop = export_for_sharing(args.model, args.output, half=not args.full_precision)
    what = f"an ensemble of {len(args.model)} models" if len(args.model) > 1 else "the model"
    print(f"export: wrote {what} to {args.output} (crop settings {crop})")
    print(f"export: {calibrate_export(args.output, getattr(args, 'calibration_data', None))}")
    return 0


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


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="out/demo", help="folder for the demo's photos and results")


@command("demo", add_demo_arguments)
def run_demo_command(args: argparse.Namespace) -> int:
    from agepipe.demo import run_demo

    result = run_demo(args.output)
    print(f"\n{result['summary'].render('score')}\n\n{result['faces']}\n\nreport: {result['report']}")
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command; with `only`, the flags of that one command alone: a command's choices come from
    registries whose modules import PyTorch, which `agepipe crop` and `agepipe --help` need not wait for."""
    parser = argparse.ArgumentParser(prog="agepipe", description="Facial age estimation at scale on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        # Flags not given stay out of the namespace, so that a given flag may set None (`--pretrained none`).
        sub = subparsers.add_parser(name, argument_default=argparse.SUPPRESS)
        if only in (None, name):
            sub.add_argument("--config", help="YAML file of settings (the flags given override it)")
            sub.add_argument("--debug", action="store_true", help="on a failure, the full traceback, not one line")
            add_arguments(sub)
    return parser


def remote_uris(args: argparse.Namespace) -> list[str]:
    """The storage URIs a command was given (its inputs, outputs and model), for naming in a failure."""
    return [str(v) for v in vars(args).values() if isinstance(v, str) and storage.is_remote(v)]


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    debug = getattr(args, "debug", False)
    if args.command in ("crop", "score") and not debug:
        quiet_ray_data_failures()
    try:
        return run(args)
    except Exception as exc:
        if debug:
            raise
        status, line = failure_line(args.command, exc, remote_uris(args))
        if not line:
            raise
        storage.retries_needed()  # ends the job's retry counter, which would outlive it on a cluster
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
