"""Stand-in for torchvision, used only in this repository's MONAI Label environment (``make monailabel-env``).

monailabel 0.8.5 imports ``torchvision.utils.make_grid``/``save_image`` at module level in
``monailabel/transform/post.py`` (for ``DumpImagePrediction2Dd``, a debug dump of 2D pathology predictions) and
``monailabel/deepedit/handlers.py`` (TensorBoard image grids of DeepEdit training). The monaibundle app serving this
repository's bundles calls neither. The registry's only torchvision builds for torch 2.13 are CUDA builds, whose
compiled ops fail to register beside the CPU torch. So this package makes those two imports succeed and
raises if either function is ever called. The version is 0.0.0 so that MONAI's version-gated optional imports of
torchvision treat it as absent.
"""

__version__ = "0.0.0"
