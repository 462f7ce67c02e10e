"""medseg_nets: lightweight segmentation networks and the few parts MONAI lacks, for the medseg-bundles bundles."""

__version__ = "0.1.0"

from . import data, engines, handlers, losses, nets, transforms, utils  # noqa: E402  (subpackages usable from configs)
from .errors import InputDataError  # noqa: E402

__all__ = ["InputDataError", "data", "engines", "handlers", "losses", "nets", "transforms", "utils", "__version__"]
