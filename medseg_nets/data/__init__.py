"""Dataset readers (datalists from the real layouts) and writers for predictions."""

from .msd import check_nifti_headers, msd_datalists, seeded_split
from .writers import NiftiLikeInputWriter
from .png import PNGMaskWriter, overlay_mask
from .skin import check_skin_headers, detect_skin_format, grey_mask, rgb_image, skin_datalists

__all__ = ["NiftiLikeInputWriter", "check_nifti_headers", "msd_datalists", "seeded_split"]
__all__ += ["PNGMaskWriter", "check_skin_headers", "detect_skin_format", "grey_mask", "overlay_mask", "rgb_image", "skin_datalists"]
from .brats import MODALITIES as BRATS_MODALITIES, brats_case_name, brats_datalists, brats_name_formatter, check_brats_headers  # noqa: E402
__all__ += ["BRATS_MODALITIES", "brats_case_name", "brats_datalists", "brats_name_formatter", "check_brats_headers"]
from .inputs import Datalists, LazyDatalist, find_datalists, output_stem  # noqa: E402
from .skin import exif_orientation  # noqa: E402
__all__ += ["Datalists", "LazyDatalist", "exif_orientation", "find_datalists", "output_stem"]
from .datasets import CacheDataset  # noqa: E402
__all__ += ["CacheDataset"]
