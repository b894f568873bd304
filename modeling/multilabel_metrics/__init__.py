"""The multi-label metrics as an importable module and as a local `evaluate` module.

``evaluate.load(METRIC_PATH)`` loads `multilabel_metrics.py` from this folder, offline.
"""

from pathlib import Path

from .multilabel_metrics import MultilabelMetrics, compute_multilabel_metrics

#: Pass to `evaluate.load` to get the metric without the Hub.
METRIC_PATH = str(Path(__file__).resolve().parent)

__all__ = ["METRIC_PATH", "MultilabelMetrics", "compute_multilabel_metrics"]
