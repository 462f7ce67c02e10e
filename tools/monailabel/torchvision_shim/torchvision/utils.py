"""The two names monailabel 0.8.5 imports from ``torchvision.utils``; calling either is an error (see __init__)."""


def _absent(name: str):
    def f(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision.utils.{name}: torchvision is not installed in this MONAI Label environment (a stand-in "
            "that only lets monailabel import; see tools/monailabel/torchvision_shim)"
        )

    f.__name__ = name
    return f


make_grid = _absent("make_grid")
save_image = _absent("save_image")
