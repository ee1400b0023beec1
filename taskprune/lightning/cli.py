"""LightningCLI for taskprune: ``python train.py fit|test|validate --config configs/<task>.yaml``.

``fit`` calibrates (attribution passes, no weight update) and the ``pruning`` callback writes and applies the spec;
``test`` applies the spec from ``pruning.output_dir`` and reports dense vs pruned metrics in-domain and on every
out-of-domain set, with parameters, MACs and measured throughput, as a rich table and as ``<stage>_report.json`` /
``<stage>_report.csv`` in ``pruning.output_dir`` (written atomically, for scripts).

Groups: ``model`` (:class:`~taskprune.lightning.module.AttributionModule`, with ``model.attribution``: an
:class:`~taskprune.attribution.AttributionConfig`), ``data`` (:class:`~taskprune.lightning.data.TaskDataModule`) and
``pruning`` (:class:`~taskprune.lightning.callback.TaskPruning`, with ``pruning.budget``: a :class:`~taskprune.selection.Budget`).
The task is data: ``data.task`` (a shipped name, a task definition file, or the definition inline; see
:mod:`taskprune.tasks`). Values that must agree are linked, not repeated: ``data.task`` -> ``model.task``,
``model.attribution`` ->
``pruning.attribution`` (method, units...: one source of truth) and ``data.max_length`` -> ``pruning.budget.seq_len``.
Field docstrings of the config dataclasses are the ``--help`` text.

Errors in what was given (a ``ValueError``, ``TypeError``, ``FileExistsError``, ``FileNotFoundError``,
``NotADirectoryError`` or ``PermissionError``) are printed as one line, ``taskprune: error: <message>``, with exit status
2; ``--verbose`` (anywhere on the command line) or ``TASKPRUNE_VERBOSE=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from taskprune.lightning.callback import TaskPruning
from taskprune.lightning.data import TaskDataModule
from taskprune.lightning.module import AttributionModule

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the calibration set
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,  # no validation during calibration
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "callbacks": [RichProgressBar()],
}


class TaskPruneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TaskPruning, "pruning")
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("model.attribution", "pruning.attribution")
        parser.link_arguments("data.max_length", "pruning.budget.seq_len")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the model's arguments with the hyperparameters saved in ``--ckpt_path``, so a resumed
        ``fit`` would silently calibrate with the checkpoint's settings, not the ones given. For ``fit``, keep the ones
        given: a resume whose settings differ from its checkpoint's is refused, naming them."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        pruning = next((c for c in self.trainer.callbacks if isinstance(c, TaskPruning)), None)
        if ckpt_path is not None and pruning is not None:
            pruning.check_checkpoint(ckpt_path, self.model)  # before Lightning loads its weights

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("test", "validate"):
            kwargs["verbose"] = False  # the rich dense-vs-pruned table (after_test) replaces Lightning's per-loader ones
        return kwargs

    def after_test(self) -> None:
        self._report("test")

    def after_validate(self) -> None:
        self._report("validate")

    def _report(self, stage: str) -> None:
        from taskprune.flops import count_macs, count_params
        from taskprune.lightning.report import comparison_table, print_table, write_report

        module = self.model
        if not self.trainer.is_global_zero or not module.results:
            return
        dense = module.dense_model if module.dense_model is not None else module.model
        seq_len = getattr(self.datamodule, "max_length", None) or 128  # MACs at the data's length, as the budget
        size = {
            "params_dense": count_params(dense), "params_pruned": count_params(module.model), "seq_len": seq_len,
            "macs_dense": count_macs(dense, seq_len), "macs_pruned": count_macs(module.model, seq_len),
            "throughput_dense": module.throughput.get("dense"), "throughput_pruned": module.throughput.get("pruned"),
        }
        pruning = next((c for c in self.trainer.callbacks if isinstance(c, TaskPruning)), None)
        foreign = pruning.foreign if pruning is not None and module.spec_mode else None
        runtime = getattr(module, "runtime_model", None)
        runtime = (f"ONNX Runtime, {runtime.info.get('quantize') or 'fp32'}" if runtime is not None else "PyTorch")
        title = f"taskprune {stage}: {module.task.name}, spec {module.spec_mode or 'none (dense)'}"
        if module.spec_mode:
            title += f", pruned model run by {runtime}"
        if foreign:
            title += f" (FOREIGN spec: {foreign}; allowed by allow_foreign_spec)"
        print_table(comparison_table(module.results, size, title=title))
        if pruning is not None:
            meta = {"stage": stage, "task": module.task.name, "spec": module.spec_mode or "none (dense)",
                    "eval_sets": list(module.eval_names), "foreign_spec": foreign,
                    "runtime": runtime if module.spec_mode else None}
            paths = write_report(module.results, size, pruning.output_dir, stage, meta)
            logging.getLogger(__name__).info("taskprune: wrote %s", ", ".join(str(p) for p in paths))


def _help_from_field_docstrings() -> None:
    """Let jsonargparse read the attribute docstrings of the config dataclasses as ``--help`` text, each class's once
    per process: reading them parses the class's source, and LightningCLI builds one parser per subcommand (fit,
    validate, test, predict), so the Trainer's source was parsed four times per start (most of the start-up)."""
    import jsonargparse

    if hasattr(jsonargparse, "set_parsing_settings"):
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:  # jsonargparse < 4.35
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    try:
        from jsonargparse import _optionals
    except ImportError:
        return
    parse = getattr(_optionals, "parse_docstring", None)
    if parse is None or hasattr(parse, "uncached"):
        return
    cached = functools.lru_cache(maxsize=None)(parse)

    def parse_docstring(component, params=False, logger=None):
        try:
            return cached(component, params, logger)
        except TypeError:  # an unhashable component
            return parse(component, params, logger)

    parse_docstring.uncached = parse
    _optionals.parse_docstring = parse_docstring


BAD_INPUT = (ValueError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError,
             ImportError)  # ImportError: an optional extra that is not installed (e.g. deploy)
"""Exceptions that say what was given is wrong: one line and exit status 2 on the command line."""


def check_config_files(argv: list[str]) -> None:
    """Refuse a ``--config`` / ``-c`` file that is a folder, a broken link or a link loop, or is not UTF-8 text, naming
    it (jsonargparse would say "does not exist", or show the decoder's error without the file). A missing file is
    left to jsonargparse, which names it."""
    from taskprune.io import file_problem

    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    paths += [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    for path in paths:
        problem = file_problem(path)
        if problem == "does not exist":
            continue
        if problem is not None:
            raise ValueError(f"--config {path!r} {problem}; pass a YAML config file, e.g. configs/sst2.yaml")
        data = Path(path).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            start = data.rfind(b"\n", 0, e.start) + 1  # of the line
            line, column = data.count(b"\n", 0, e.start) + 1, e.start - start + 1
            seen = data[max(start, e.start - 20):e.start + 1].decode("latin-1")
            raise ValueError(f"--config {path!r} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column "
                             f"{column} ({seen!r} if read as latin-1); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 "
                             f"{path} > fixed.yaml") from None


def main(args: list[str] | None = None, run: bool = True, one_line_errors: bool | None = None) -> TaskPruneCLI:
    """Run the CLI on ``args`` (default: the command line).

    ``one_line_errors`` (default: on when reading the command line, off when ``args`` are given, so Python callers
    get the exception): a :data:`BAD_INPUT` error is printed as ``taskprune: error: <message>`` on stderr and the
    process exits with status 2. ``--verbose`` in the arguments, or ``TASKPRUNE_VERBOSE=1``, keeps the traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv or os.environ.get("TASKPRUNE_VERBOSE", "0") not in ("", "0")
    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
        if args is None:  # the command line: what LightningCLI and the processes of a multi-device run read
            sys.argv[1:] = argv
            os.environ["TASKPRUNE_VERBOSE"] = "1"
    if one_line_errors is None:
        one_line_errors = args is None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _help_from_field_docstrings()
    try:
        check_config_files(argv)
        return TaskPruneCLI(
            AttributionModule,
            TaskDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=None,
            seed_everything_default=0,
            args=None if args is None else argv,
            run=run,
        )
    except BAD_INPUT as e:
        if verbose or not one_line_errors:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"taskprune: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
