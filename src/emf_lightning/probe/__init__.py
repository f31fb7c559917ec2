"""The discriminability probe: do a text encoder's features tell scenes apart? Pure metrics (``metrics``),
the captions they are measured on (``sets``), one encoder over one set (``evaluation``), and the image
embedders that give shards without scene specs their relevance (``image_embedders``)."""

from emf_lightning.probe.evaluation import ProbeResult, encode_captions, evaluate_encoded, evaluate_probe
from emf_lightning.probe.sets import ProbeSet, shapes_probe_set, shard_probe_set

__all__ = [
    "ProbeResult",
    "ProbeSet",
    "encode_captions",
    "evaluate_encoded",
    "evaluate_probe",
    "shapes_probe_set",
    "shard_probe_set",
]
