"""Transforms MONAI lacks: input checks that name the bad file, label-to-channel conversion, identifiers."""

from . import authors_brats, brats, checks, labels, output, skin, slices, spatial
from .authors_brats import *  # noqa: F401,F403
from .brats import *  # noqa: F401,F403
from .checks import *  # noqa: F401,F403
from .labels import *  # noqa: F401,F403
from .output import *  # noqa: F401,F403
from .skin import *  # noqa: F401,F403
from .slices import *  # noqa: F401,F403
from .spatial import *  # noqa: F401,F403

# the package exports exactly what each submodule declares in its own __all__
__all__ = [
    *checks.__all__,
    *labels.__all__,
    *skin.__all__,
    *brats.__all__,
    *slices.__all__,
    *authors_brats.__all__,
    *output.__all__,
    *spatial.__all__,
]
