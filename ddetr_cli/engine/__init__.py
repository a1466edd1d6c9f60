"""The engine: the three entry points and everything they run.

:func:`run_training`, :func:`run_evaluation` and :func:`run_prediction` are
what ``ddetr train``, ``ddetr eval`` and ``ddetr predict`` call; scripts call
them the same way. The folder reads as a map, each layer importing only the
ones above it in this list::

    config.py      TrainConfig: every training knob, typed, with its resolution order
    parts/         amp, device, distributed, ema, interrupt, labelmap, optim, sampler, schedule
    report/        progress (terminal), metrics (CSV + plot), annotated (prediction images)
    runs/          folders (run-folder naming), checkpoint, rng, budget (time limit), assemble
    loops/         step + train, evaluate, runner (load_runner(): the one runner chooser) + predict
    run_train.py   run_training(), build_trainer()
    run_eval.py    run_evaluation()
    run_predict.py run_prediction(), PredictOptions (and load_runner(), re-exported)

Names load on first use (PEP 562), so importing the engine costs nothing
until something is called: ``ddetr --help`` never loads torch or scipy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_training": ".run_train",
    "build_trainer": ".run_train",
    "run_evaluation": ".run_eval",
    "EvalRun": ".run_eval",
    "run_prediction": ".run_predict",
    "PredictOptions": ".run_predict",
    "load_runner": ".run_predict",
    "TrainConfig": ".config",
    "read_config_yaml": ".config",
    "resolve": ".config",
    "resolve_device": ".parts.device",
    "resolve_label_map": ".parts.labelmap",
    "Trainer": ".loops.train",
    "TrainResult": ".loops.train",
    "TrainingInterrupted": ".loops.train",
    "build_criterion": ".loops.step",
    "train_step": ".loops.step",
    "STAT_NAMES": ".report.metrics",
    "EvalResult": ".loops.evaluate",
    "coco_evaluate": ".loops.evaluate",
    "evaluate": ".loops.evaluate",
    "PredictResult": ".loops.predict",
    "Predictor": ".loops.predict",
    "TorchRunner": ".loops.runner",
    "ModelRunner": ".loops.runner",
    # the error types, re-exported from ddetr_cli.errors for convenience
    "ClassMismatchError": "..errors",
    "DeviceError": "..errors",
    "RunError": "..errors",
    "TrainConfigError": "..errors",
    "TrainingError": "..errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
