"""The command line of every task: ``python -m tasks.<task> fit|validate|test|predict|export ...``.

* :class:`TaskCLI`: ``LightningCLI`` with forced checkpoint/LR-monitor/inference callbacks,
  TensorBoard + CSV logs, and checkpoint hyper-parameters that never override explicit values;
* :func:`cli_main`: the entry point each task's ``main`` calls, with room for extra subcommands;
* :func:`export_main`: ``export --ckpt C --out model.onnx`` (``--format pretrained``: a folder).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from tasks.callbacks import InferenceOptimization, OptionalLearningRateMonitor
from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT, check_finite, check_task, load_task, read_checkpoint
from tasks.classes import CHECKPOINT_KEY as CLASSES_METADATA_KEY
from tasks.module import TaskModule, moved_option
from tasks.progress import LogProgress
from tasks.resume import ExactResume, StopSignalConnector, exit_on_signal
from vggbackbone.deploy import export_task_onnx
from vggbackbone.models.pretrained import export_pretrained

__all__ = ["TaskCLI", "cli_main", "export_main"]


class TaskCLI(LightningCLI):
    """LightningCLI with the callbacks every task wants, configurable from YAML.

    * ``checkpoint:`` the best checkpoint by the task's metric (``best-<epoch>.ckpt``);
    * ``last_checkpoint:`` ``last.ckpt``, rewritten at the end of every training epoch, which is
      what ``--ckpt_path last`` and resuming use (Lightning 2.6's ``save_last`` only rewrites it
      when a new best is saved);
    * ``inference:`` :class:`InferenceOptimization` of the model used by ``predict``;
    * ``lr_monitor:`` learning-rate logging (inactive with ``trainer.logger: false``);
    * ``progress:`` when stdout is not a terminal (``nohup``, cluster logs), :class:`LogProgress`
      prints a plain line every ``progress.interval_s`` seconds instead of Lightning's bar;
    * ``--ckpt_path last``: the newest ``last.ckpt`` of the run (``last_checkpoint.dirpath`` when
      set, else under ``trainer.default_root_dir``), resumed in its own ``version_N`` folder;
    * a checkpoint given by ``--ckpt_path`` is read safely, and one that is not a checkpoint of
      this task is an error naming the file (:func:`tasks.checkpoint.read_checkpoint`);
    * the task's own always-on callbacks (``callbacks=`` of :func:`cli_main`).

    Argument links from the data module to the model (``data.num_classes -> model.num_classes``)
    come from the task's ``links``. When ``trainer.default_root_dir`` is changed, the default
    loggers follow it.
    """

    task_name: str = "task"
    task_monitor: tuple[str, str] = ("val/loss", "min")
    task_links: Sequence[tuple[str, str, str]] = ()
    task_callbacks: Mapping[str, type[pl.Callback]] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        monitor, mode = self.task_monitor
        parser.set_defaults(
            {
                "checkpoint.monitor": monitor,
                "checkpoint.mode": mode,
                "checkpoint.save_last": False,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "last_checkpoint.save_on_train_epoch_end": True,
            }
        )
        parser.add_lightning_class_args(InferenceOptimization, "inference")
        parser.add_class_arguments(LogProgress, "progress", instantiate=False)
        parser.add_lightning_class_args(OptionalLearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        for key, callback_class in self.task_callbacks.items():
            parser.add_lightning_class_args(callback_class, key)
        for source, target, apply_on in self.task_links:
            parser.link_arguments(source, target, apply_on=apply_on)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._cli_args = (
            None
            if isinstance(args, (dict, Mapping)) or hasattr(args, "as_dict")
            else (list(sys.argv[1:] if args is None else args))
        )
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyper-parameters fill the model config; what the user gave explicitly wins.

        Lightning 2.6 lets the checkpoint's stored ``model`` arguments override the config file and
        the command line, so ``validate --ckpt_path X --model.score_thresh 0.5`` would silently run
        with the training value. Here the user's explicit ``model`` values (config files and flags,
        without parser defaults) are applied again on top. Pretrained weights named in the config
        (``weights_backbone``) become :data:`WEIGHTS_IN_CHECKPOINT` where the checkpoint says so:
        its state dict replaces them, so they are not fetched (a checkpoint that kept naming its
        weights, see :meth:`TaskModule.on_save_checkpoint`, keeps them).
        """
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return
        self._resolve_last(sub)
        path = self.config[sub].get("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry") or "://" in str(path):
            return
        ckpt = read_checkpoint(path)  # safely; errors name the file
        check_task(ckpt, self.model_class, path)
        self._checkpoint_hparams(sub, ckpt)
        stored = self.config[sub].get("model")  # the checkpoint's hyper-parameters, where it had some
        in_checkpoint = [
            key for key in getattr(self.model_class, "pretrained_hparams", ())
            if stored is not None and stored.get(key) == WEIGHTS_IN_CHECKPOINT
        ]  # fmt: skip
        if self._cli_args is not None:
            explicit = self.parser.parse_args(self._cli_args, defaults=False)
            model = explicit.get(sub, {}).get("model") if hasattr(explicit.get(sub, {}), "get") else None
            if model:
                given = model.as_dict() if hasattr(model, "as_dict") else dict(model)
                self.config = self.parser.parse_object({sub: {"model": given}}, self.config)
        model_cfg = self.config[sub].get("model")
        for key in in_checkpoint:
            if model_cfg.get(key) is not None:
                model_cfg[key] = WEIGHTS_IN_CHECKPOINT

    def _checkpoint_hparams(self, sub: str, ckpt: Mapping[str, Any]) -> None:
        """Lightning's ``_parse_ckpt_path`` on an already read checkpoint: its hyper-parameters fill ``model``.

        Only as plain data (dataclasses such as ``OptimConfig`` as mappings): before any parsing,
        values the parser would resolve to code (a ``class_path``/``init_args``/``_class_path``
        mapping anywhere, also inside a YAML string; a string under an option whose strings the
        parser imports or reads as a config file) are refused naming the checkpoint and the key
        (:func:`tasks.checkpoint.check_plain_hparams`).
        """
        from tasks.checkpoint import check_plain_hparams, parser_string_options, plain_data

        path = self.config[sub].get("ckpt_path")
        check_plain_hparams(ckpt, path, parser_string_options(self._parser(sub), "model"))
        # dataclasses (optim) as mappings, as a YAML file gives them: an instance would reach instantiation as is
        hparams = plain_data(dict(ckpt.get("hyper_parameters") or {}))
        hparams.pop("_instantiator", None)  # Lightning's own (the only one check_plain_hparams lets through): unused
        for old in getattr(self.model_class, "moved_options", {}):  # an older checkpoint's predict_dir...: not
            hparams.pop(old, None)  # model options any more, and only ever a run setting (writer.* now)
        if not hparams:
            return
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def _resolve_last(self, sub: str) -> None:
        """``--ckpt_path last`` -> the newest ``last.ckpt`` of this run, or an error naming where it looked.

        With a fixed ``last_checkpoint.dirpath`` (the same command at every start of a cluster
        job), its ``last.ckpt``; absent, the run starts from scratch (Lightning warns "no last
        checkpoint available"): the first start. Without one, the newest ``**/last.ckpt`` under
        ``trainer.default_root_dir``; the run then logs into the checkpoint's ``version_N`` (the
        TensorBoard logger's version). None found there is an error.
        """
        cfg = self.config[sub]
        if cfg.get("ckpt_path") != "last":
            return
        last_cfg = cfg.get("last_checkpoint") or {}
        name = f"{last_cfg.get('filename') or 'last'}.ckpt"
        dirpath = last_cfg.get("dirpath")
        if dirpath:
            if (Path(dirpath) / name).is_file():
                cfg["ckpt_path"] = str(Path(dirpath) / name)
            return  # not there yet: the first start of the job, from scratch
        root = Path((cfg.get("trainer") or {}).get("default_root_dir") or f"runs/{self.task_name}")
        found = sorted(root.glob(f"**/{name}"), key=lambda p: p.stat().st_mtime_ns) if root.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no {name} under {root.resolve()} (looked for {root}/**/{name}); give the "
                "checkpoint's path, or --last_checkpoint.dirpath DIR to start from scratch when DIR has none"
            )
        cfg["ckpt_path"] = str(found[-1])
        self._resume_from = found[-1]
        print(f"--ckpt_path last: resuming from {found[-1]} (the newest of {len(found)} under {root})")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        self._move_writer_options(cfg)
        trainer = cfg.get("trainer")
        if trainer is None:
            return
        default_root = f"runs/{self.task_name}"
        root = trainer.get("default_root_dir")
        loggers = trainer.get("logger")
        if root and root != default_root and isinstance(loggers, list):
            for logger in loggers:
                init = logger.get("init_args") if hasattr(logger, "get") else None
                if init is not None and init.get("save_dir") == default_root:
                    init["save_dir"] = root
        resumed = getattr(self, "_resume_from", None)
        first = loggers[0] if isinstance(loggers, list) and loggers else loggers
        init = first.get("init_args") if hasattr(first, "get") else None
        match = re.fullmatch(r"version_(\d+)", resumed.parent.parent.name) if resumed is not None else None
        if match and init is not None and init.get("save_dir") is not None and resumed.parent.name == "checkpoints":
            # the first logger's folder holds the checkpoints: a resumed run goes on in the same version_N
            folder = Path(init["save_dir"]) / (init.get("name") or "")
            if folder.resolve() == resumed.parent.parent.parent.resolve():
                init["version"] = int(match.group(1))

    def _move_writer_options(self, cfg: Any) -> None:
        """Old model options that now belong to the writer (``model.predict_dir`` -> ``writer.output_dir``):
        moved there, warned once; given with a different ``writer`` value as well, an error naming both."""
        model, writer = cfg.get("model"), cfg.get("writer")
        moved = getattr(self.model_class, "moved_options", {})
        if model is None or writer is None or not moved:
            return
        parser = self._parser(self.subcommand) if self.subcommand else self.parser
        for old, convert in moved.items():
            value = model.get(old)
            if value is None:
                continue
            for key, new in moved_option(old, convert(value)).items():
                given = writer.get(key)
                if given != parser.get_default(f"writer.{key}") and given != new:
                    raise ValueError(f"model.{old} is the old name of writer.{key}: give only writer.{key}")
                writer[key] = new
            model[old] = None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        """Lightning's, plus :class:`LogProgress` when stdout is not a terminal (and a bar is wanted)."""
        wanted = config.get("enable_progress_bar") is not False
        configured = any(isinstance(c, ProgressBar) for c in [*callbacks, *(config.get("callbacks") or [])])
        if wanted and not configured and not sys.stdout.isatty():
            options = self._get(self.config, "progress", default=None)
            kwargs = options.as_dict() if hasattr(options, "as_dict") else dict(options or {})
            callbacks = [*callbacks, LogProgress(**kwargs)]
        # exact resume and clean stops on SIGTERM/SIGINT (tasks.resume): last.ckpt is where a stop saves
        last = self._get(self.config_init, "last_checkpoint", default=None)
        trainer = super()._instantiate_trainer(config, [*callbacks, ExactResume(last)])
        trainer._signal_connector = StopSignalConnector(trainer)
        return trainer


def export_main(model_class: type[pl.LightningModule], task: str, argv: list[str]) -> Path:
    """``python -m tasks.<task> export --ckpt C --out model.onnx [--format onnx|pretrained] [--height H --width W]``.

    Loads a checkpoint of ``fit``, takes :meth:`TaskModule.export_model` and writes ONNX with
    dynamic batch and image size through :func:`vggbackbone.models.export.export_task_onnx`,
    checked against onnxruntime on two input sizes (``--no-verify`` skips that). The model's
    classes (:meth:`tasks.classes.ClassSet.record` as JSON: names, detection's category ids,
    segmentation's ignore index) are in the file's ``metadata_props`` under ``classes``.

    ``--format pretrained`` writes the task's model as a folder instead (``--out`` names it):
    ``config.json`` (registry name and builder options, the classes under ``metadata``) and
    ``model.safetensors``, which :func:`vggbackbone.models.from_pretrained` rebuilds without
    Lightning; the rebuilt model is checked to give the same outputs on the example input.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{task} export", description=export_main.__doc__)
    parser.add_argument("--ckpt", required=True, help=f"checkpoint written by `python -m tasks.{task} fit`")
    parser.add_argument("--out", required=True, help="output .onnx file, or folder for --format pretrained")
    parser.add_argument(
        "--format", choices=("onnx", "pretrained"), default="onnx",
        help="onnx (default) or pretrained: a save_pretrained folder (config.json + model.safetensors)",
    )  # fmt: skip
    parser.add_argument("--height", type=int, default=224, help="height of the example input (default 224)")
    parser.add_argument("--width", type=int, default=224, help="width of the example input (default 224)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-verify", action="store_true", help="do not check the file with onnxruntime")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: checkpoint not found")
    module = load_task(model_class, ckpt)  # safely, errors naming the file, its task/arch and what was expected
    check_finite(module.state_dict(), f"{ckpt}: weights")
    if not isinstance(module, TaskModule):
        raise TypeError(f"{model_class.__name__} is not a tasks.module.TaskModule: it does not say what to export")
    example = module.export_example(args.height, args.width)  # the task knows its input form
    classes = module.class_set()  # what the outputs mean travels with the file (tasks.classes)
    if args.format == "pretrained":
        detector_input = isinstance(example, torch.Tensor) and example.dim() == 3  # one image: a detector's list
        metadata = {"classes": classes.record()} if classes is not None else None
        out = export_pretrained(module.model, args.out, [example] if detector_input else example, metadata=metadata)
        print(f"export: {ckpt} -> {out}")
        return out
    model = module.export_model().eval()
    kwargs: dict[str, Any] = {"verify": not args.no_verify}
    if args.opset is not None:
        kwargs["opset"] = args.opset
    if classes is not None and classes.kind != "identities":  # ReID exports embeddings, not its classifier
        kwargs["metadata"] = {CLASSES_METADATA_KEY: json.dumps(classes.record())}
    out = export_task_onnx(model, args.out, example, **kwargs)
    print(f"export: {ckpt} -> {out}")
    return out


def cli_main(
    model_class: type[pl.LightningModule],
    datamodule_class: type[pl.LightningDataModule],
    *,
    task: str,
    monitor: tuple[str, str],
    links: Iterable[tuple[str, str, str]] = (),
    callbacks: Mapping[str, type[pl.Callback]] | None = None,
    extra_commands: Mapping[str, Callable[[list[str]], Any]] | None = None,
    args: list[str] | None = None,
    run: bool = True,
) -> TaskCLI | Any:
    """Entry point of ``python -m tasks.<task> fit|validate|test|predict --config ...``.

    ``callbacks`` maps YAML keys to callback classes that are always on (configured as
    ``<key>.<arg>``); the task's :attr:`~tasks.module.TaskModule.writer_class` is always there as
    ``writer``. ``export`` (:func:`export_main`) is always
    there; ``extra_commands`` maps further subcommands (``extract``...) to functions that take
    the remaining argv. Logs and
    checkpoints go to ``runs/<task>/`` unless the YAML says otherwise
    (``trainer.default_root_dir``, ``trainer.logger``).
    """
    argv = list(sys.argv[1:] if args is None else args)
    commands: dict[str, Callable[[list[str]], Any]] = {"export": lambda rest: export_main(model_class, task, rest)}
    commands.update(extra_commands or {})
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])

    writer = getattr(model_class, "writer_class", None)  # what predict writes: writer.* in every task
    attrs = {
        "task_name": task,
        "task_monitor": monitor,
        "task_links": tuple(links),
        "task_callbacks": ({"writer": writer} if writer is not None else {}) | dict(callbacks or {}),
    }
    cli_cls = type(f"{task.capitalize()}CLI", (TaskCLI,), attrs)
    root = f"runs/{task}"
    trainer_defaults = {
        "default_root_dir": root,
        "plugins": [{"class_path": "tasks.checkpoint.AtomicCheckpointIO"}],
        "logger": [
            # the first logger's folder (runs/<task>/version_N) also holds checkpoints and config.yaml
            {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": root, "name": "", "default_hp_metric": False},
            },
            {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "csv"}},
        ],
    }
    module = getattr(sys.modules.get("__main__"), "__spec__", None)
    module_name = module.name if module is not None and module.name.startswith("tasks.") else f"tasks.{task}"
    with warnings.catch_warnings(), exit_on_signal(module_name, argv):
        warnings.filterwarnings("ignore", message=".*LightningCLI.*subclass_mode.*")
        return cli_cls(
            model_class,
            datamodule_class,
            trainer_defaults=trainer_defaults,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            # one way to set the optimiser: model.optim (LightningCLI's --optimizer/--lr_scheduler
            # would replace configure_optimizers, dropping parameter groups and the schedule)
            auto_configure_optimizers=False,
            args=args,  # None: LightningCLI reads sys.argv itself (and does not warn)
            run=run,
        )
