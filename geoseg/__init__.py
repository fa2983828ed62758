"""geoseg: streaming land-cover segmentation of large multispectral GeoTIFFs.

Importing the package is cheap: torch and rasterio load only when a function that needs them
is first used, so ``geoseg --help`` stays instant.
"""

from ._version import __version__
from .errors import (
    CheckpointError,
    ConfigError,
    DependencyNotFoundError,
    GeosegError,
    InputError,
    OutputError,
)

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DependencyNotFoundError",
    "GeosegError",
    "InputError",
    "OutputError",
    "PredictConfig",
    "predict_scene",
]


def __getattr__(name: str):
    # NOTE: lazy re-exports (PEP 562) keep `import geoseg` free of torch.
    if name == "predict_scene":
        from .pipeline import predict_scene

        return predict_scene
    if name == "PredictConfig":
        from .config import PredictConfig

        return PredictConfig
    raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
