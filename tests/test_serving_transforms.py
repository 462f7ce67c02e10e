"""medseg_nets.transforms.Spacingd (MONAI Label's ``image_path`` key) and AsLabelMapd (the written label map)."""

from __future__ import annotations

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged

from medseg_nets.transforms import AsLabelMapd, Spacingd


def _loaded(tmp_path):
    path = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 10, 8), dtype=np.float32),
                             np.diag([1.2, 1.0, 1.5, 1.0])), path)
    load = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])
    return path, load


def test_spacingd_keeps_monai_labels_image_path_and_matches_monai(tmp_path):
    path, load = _loaded(tmp_path)
    ours = Spacingd("image", pixdim=(1.0, 1.0, 1.0))
    if tuple(int(v) for v in monai.__version__.split(".")[:2]) >= (1, 6):
        with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):  # why ours exists
            monai.transforms.Spacingd("image", pixdim=(1.0, 1.0, 1.0))(load({"image": str(path), "image_path": "x"}))
    d = ours(load({"image": str(path), "image_path": str(path)}))
    assert d["image_path"] == str(path)
    ref = monai.transforms.Spacingd("image", pixdim=(1.0, 1.0, 1.0))(load({"image": str(path)}))
    torch.testing.assert_close(d["image"].as_tensor(), ref["image"].as_tensor())
    assert tuple(d["image"].shape) == (1, 14, 10, 12)
    back = Invertd("image", transform=Compose([ours]), orig_keys="image")(dict(d))  # the inverse is MONAI's
    assert tuple(back["image"].shape) == (1, 12, 10, 8)


def test_as_label_map_casts_squeezes_and_names_the_extension():
    pred = MetaTensor(torch.tensor([[[0.0, 1.0], [4.0, 2.0]]]), affine=torch.eye(4))
    d = AsLabelMapd("pred")({"pred": pred})
    assert d["pred"].dtype == torch.uint8 and tuple(d["pred"].shape) == (1, 2, 2) and "result_extension" not in d
    assert isinstance(d["pred"], MetaTensor)
    d = AsLabelMapd("pred", squeeze_channel=True, result_extension=".png")({"pred": pred})
    assert tuple(d["pred"].shape) == (2, 2) and d["result_extension"] == ".png"
    d = AsLabelMapd("pred", result_extension=".png")({"pred": np.ones((1, 2, 2)), "result_extension": ".nrrd"})
    assert d["pred"].dtype == np.uint8 and d["result_extension"] == ".nrrd"  # a request's own extension wins
    with pytest.raises(ValueError, match="integer"):
        AsLabelMapd("pred", dtype="float32")
    with pytest.raises(ValueError, match="channels"):
        AsLabelMapd("pred", squeeze_channel=True)({"pred": torch.zeros(3, 2, 2)})
