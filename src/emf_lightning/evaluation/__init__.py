"""Sample quality without Lightning: the ``Evaluator`` (plan, generate, score, gather) over a ``HeldOutSet``,
its metrics (``fid``: FID/KID, ``clip_score``; ShapesEval lives in ``emf_lightning.shapes``), the process
plumbing (``distributed``) and what it writes (``outputs``). ``callbacks.evaluation`` drives it in training."""

from emf_lightning.evaluation.distributed import Processes
from emf_lightning.evaluation.evaluator import (
    EvaluationResult,
    Evaluator,
    HeldOutSet,
    collect_held_out,
    metric_key,
    setting_label,
)
from emf_lightning.evaluation.outputs import print_table, write_outputs

__all__ = [
    "EvaluationResult",
    "Evaluator",
    "HeldOutSet",
    "Processes",
    "collect_held_out",
    "metric_key",
    "print_table",
    "setting_label",
    "write_outputs",
]
