"""Dataset readers (datalists from the real layouts) and writers for predictions."""

from .msd import check_nifti_headers, msd_datalists, seeded_split
from .writers import NiftiLikeInputWriter

__all__ = ["NiftiLikeInputWriter", "check_nifti_headers", "msd_datalists", "seeded_split"]
