"""cnnxfer: transfer learning with convolutional networks, from the command line or Python."""
__version__ = "0.1.0"

from .config import ExtractConfig, SanityConfig, TrainConfig  # noqa: E402
from .engine import FitHooks, FitResult, fit  # noqa: E402
from .errors import CnnxferError  # noqa: E402
from .evaluate import evaluate_folder, predict_folder  # noqa: E402
from .features import ExtractSummary, extract_features, read_features  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = [
    "__version__", "CnnxferError", "ExtractConfig", "TrainConfig", "SanityConfig", "extract_features", "read_features",
    "ExtractSummary", "fit", "FitHooks", "FitResult", "predict_folder", "evaluate_folder", "load_model",
]
