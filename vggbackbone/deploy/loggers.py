"""The two loggers of :mod:`vggbackbone.deploy`.

They keep the names of the modules this code was written in (``vggbackbone.optimize``,
``vggbackbone.export``), which the documentation tells users to configure: a logging set-up
written for them keeps working now that the code lives in ``vggbackbone.deploy``.
"""

from __future__ import annotations

import logging

__all__ = ["export_log", "optimize_log"]

#: BatchNorm folding, the precision ``"auto"`` picked, how int8 runs on this CPU.
optimize_log = logging.getLogger("vggbackbone.optimize")
#: ONNX export progress (the file written and how well it matched PyTorch).
export_log = logging.getLogger("vggbackbone.export")
