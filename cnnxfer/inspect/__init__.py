"""What did the network learn? The views behind `cnnxfer inspect` and the `cnnxfer report` page.

One module per view; each computes a result dataclass from a model and images and writes its
PNG + CSV/JSON files through `cnnxfer.report`:

- filters: the first layer's filters as a grid; with another set of weights, what changed where
- patches: the image patches that most activate each unit, cropped to measured receptive fields
- receptive: receptive fields measured by backpropagation (residual and custom modules too)
- class_model: inputs that maximise a class score or a unit
- embedding: PCA / t-SNE maps of the penultimate features, k-NN accuracy
- invariance: units invariant to flips, a 2^-1/2 scale and a quarter turn, per stage
- layers: per stage shape, stride, receptive field, parameters, FLOPs, dead units
- worst: the highest-loss images with Grad-CAM heat maps (`cnnxfer inspect errors`)
- page: the report page (templates/); audit_page: its section for a `cnnxfer audit` folder
Everything that reads activations goes through `cnnxfer.activations`.
"""
from .class_model import ClassModelResult, class_models
from .embedding import EmbeddingResult, embed, knn_accuracy
from .filters import FiltersResult, filter_grid, inspect_filters
from .invariance import InvarianceResult, measure_invariance
from .layers import LayersResult, describe_layers
from .page import PageResult, write_report
from .patches import PatchesResult, find_patches
from .receptive import ReceptiveField, measure_receptive_fields
from .subject import Subject, load_subject
from .worst import ErrorsResult, find_errors, grad_cam

__all__ = [
    "ClassModelResult", "EmbeddingResult", "ErrorsResult", "FiltersResult", "InvarianceResult", "LayersResult",
    "PageResult", "PatchesResult", "ReceptiveField", "Subject", "class_models", "describe_layers", "embed",
    "filter_grid", "find_errors", "find_patches", "grad_cam", "inspect_filters", "knn_accuracy", "load_subject",
    "measure_invariance", "measure_receptive_fields", "write_report",
]
