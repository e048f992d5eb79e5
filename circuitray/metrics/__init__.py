"""Metrics computed from circuits (edge tables), never from models: numpy/pandas only.

depth   — Λ (inter-layer dependency) and DDB, per circuit
shift   — CSS between a model's ID circuit and its circuit on another domain
motifs  — regularized CCA between vec(Λ) and OOD accuracy across a zoo
dense   — edge table -> [circuit, edge] score matrices (shared by the above)
"""

from circuitray.metrics.depth import (
    ddb_column,
    dependency_depth_bias,
    dependency_matrix,
    depth_metrics,
    lambda_matrices,
)
from circuitray.metrics.motifs import Motif, cca_motif, task_motifs, universal_motif
from circuitray.metrics.shift import (
    VARIANTS,
    circuit_graph,
    circuit_shift_score,
    css_column,
    heat_trace,
    shift_scores,
)

__all__ = [
    "VARIANTS", "Motif", "cca_motif", "circuit_graph", "circuit_shift_score", "css_column",
    "ddb_column", "dependency_depth_bias", "dependency_matrix", "depth_metrics", "heat_trace",
    "lambda_matrices", "shift_scores", "task_motifs", "universal_motif",
]
