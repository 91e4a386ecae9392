"""cnnxfer: transfer learning with convolutional networks, from the command line or Python.

The public names load on first use (PEP 562): `from cnnxfer import fit` imports the engine and
torch then, while `cnnxfer --help` and usage errors never pay the ~2 s that torch costs to import.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ExtractConfig": "config", "TrainConfig": "config", "SanityConfig": "config", "ExportConfig": "config",
    "PredictConfig": "config", "EvaluateConfig": "config", "AuditConfig": "config",
    "AuditResult": "audit", "run_audit": "audit",
    "FitHooks": "training", "FitResult": "training", "fit": "training", "resume": "training",
    "CnnxferError": "errors",
    "evaluate_folder": "evaluate", "predict_folder": "evaluate",
    "ExportResult": "export", "export_model": "export",
    "ExtractSummary": "features", "extract_features": "features", "read_features": "features",
    "load_model": "models",
    "ProbeFit": "probe", "fit_probe": "probe",
    "Preprocess": "preprocess",
    "run_checks": "sanity",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cnnxfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
