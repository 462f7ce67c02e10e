"""Whole networks."""

from .dalight3d import DALight3D
from .eamnet import EAMNet
from .emcad import EMCAD, EMCADDecoder, EMCADNet
from .glims import GLIMS
from .pvtv2 import PyramidVisionTransformerV2, load_pvtv2_pretrained, pvt_v2_b0, pvt_v2_b1, pvt_v2_b2
from .slicewise import slices_to_volume, slicewise, volume_to_slices

__all__ = [
    "DALight3D",
    "EAMNet",
    "EMCAD",
    "EMCADDecoder",
    "EMCADNet",
    "GLIMS",
    "PyramidVisionTransformerV2",
    "load_pvtv2_pretrained",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "slices_to_volume",
    "slicewise",
    "volume_to_slices",
]
