"""MeanFlow (Geng et al., 2025) and flow matching for text-conditioned generators, in pure torch.

time.py        TimeSampler: (r, t) draws and the (start, end) schedules used across the project
conditions.py  condition tensors, the null condition, padding/stacking helpers
jvp.py         du/dt: the one production JVP (r != t rows only, graph-free, closed-form tangent rules)
losses.py      MeanFlowLoss, FlowMatchingLoss (one shared __call__ and path, targets in ``loss_on_path``)
sampling.py    sample_meanflow, sample_flow_matching (one integrator), classifier-free guidance
draws.py       reproducible noise
naive.py       ReferenceMeanFlowLoss: the naive full-batch JVP of public code (the tests' reference, the bench's baseline)
"""

from emf_lightning.meanflow.conditions import (
    Cond,
    concat_conditions,
    encode_with_null,
    merge_conditions,
    null_condition,
    null_features,
)
from emf_lightning.meanflow.draws import make_noise
from emf_lightning.meanflow.jvp import du_dt, graph_free_jvp
from emf_lightning.meanflow.losses import FlowMatchingLoss, MeanFlowLoss, Objective
from emf_lightning.meanflow.sampling import cfg_velocity, sample_flow_matching, sample_meanflow
from emf_lightning.meanflow.time import Schedule, TimeSampler, as_schedule, scheduled

__all__ = [
    "Cond",
    "FlowMatchingLoss",
    "MeanFlowLoss",
    "Objective",
    "Schedule",
    "TimeSampler",
    "as_schedule",
    "cfg_velocity",
    "concat_conditions",
    "du_dt",
    "encode_with_null",
    "graph_free_jvp",
    "make_noise",
    "merge_conditions",
    "null_condition",
    "null_features",
    "sample_flow_matching",
    "sample_meanflow",
    "scheduled",
]
