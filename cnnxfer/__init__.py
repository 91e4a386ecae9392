"""cnnxfer: transfer learning with convolutional networks, from the command line or Python."""
__version__ = "0.1.0"

from .config import ExtractConfig, TrainConfig  # noqa: E402
from .errors import CnnxferError  # noqa: E402
from .features import extract_features, read_features  # noqa: E402

__all__ = ["__version__", "CnnxferError", "ExtractConfig", "TrainConfig", "extract_features", "read_features"]
