"""``tasks/core.py``: the old home of the shared training glue still serves every name it had,
as the very objects of the modules they moved to (their tests: ``tests/test_<module>.py``)."""

from __future__ import annotations

import importlib

import tasks.core

HOMES = {
    "tasks.callbacks": ["InferenceOptimization", "OptionalLearningRateMonitor"],
    "tasks.checkpoint": ["WEIGHTS_IN_CHECKPOINT", "AtomicCheckpointIO", "backbone_weights"],
    "tasks.cli": ["TaskCLI", "cli_main", "export_main"],
    "tasks.distributed": ["all_gather_objects", "gather_unique", "is_global_zero"],
    "tasks.module": ["TaskDataModule", "TaskModule"],
    "tasks.optim": ["OptimConfig", "build_optimizer", "lr_factor"],
    "tasks.reporting": ["EvalReport", "print_metrics", "publish_metrics", "write_json"],
}


def test_old_home_reexports_every_name_from_its_new_module() -> None:
    assert sorted(tasks.core.__all__) == sorted(n for names in HOMES.values() for n in names)
    for module, names in HOMES.items():
        home = importlib.import_module(module)
        for name in names:
            assert getattr(tasks.core, name) is getattr(home, name), f"tasks.core.{name}"
