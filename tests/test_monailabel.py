"""The 3D bundles as MONAI Label's ``monaibundle`` sample app loads them: one inference and one training call each.

Written against MONAI Label 0.8.5 (``monailabel-0.8.5-202411252313-py3-none-any.whl``, the newest release on PyPI):

- ``sample-apps/monaibundle/main.py``: ``BundleInferTask(<app>/model/<name>, conf)`` and
  ``BundleTrainTask(<app>/model/<name>, conf)`` for every name in ``--conf models``;
- ``monailabel/tasks/infer/bundle.py`` (``BundleInferTask``) with ``tasks/infer/basic_infer.py``
  (``BasicInferTask.__call__``), ``transform/pre.py`` (``LoadImageTensord``), ``transform/post.py`` (``Restored``);
- ``monailabel/tasks/train/bundle.py`` (``BundleTrainTask``); ``monailabel/utils/others/generic.py``
  (``device_list``, ``device_map``, ``name_to_device``).

monailabel 0.8.5 does not install beside this environment: it requires ``monai[...,torchvision,...]>=1.4``, which pip
resolves to torch 2.14.1 with CUDA 13 and torchvision 0.29.1 (replacing torch 2.13.0+cpu) and numpy 1.26.4, and its
infer task imports torchvision at module level (``transform/post.py``). So when ``monailabel`` imports, these tests
use its real ``BundleInferTask``/``BundleTrainTask``; otherwise ``_InferTask``/``_train`` below make the same config
reads, overrides and calls, in the same order. Not reproduced: the ``scripts`` module unloading (our bundles have no
``scripts/``), ``displayable_configs`` and tracking (our bundles define neither), the multi-GPU torchrun launch (only
with more than one GPU; its config merge is checked) and the itk label writer (the tests check the array and affine
that the writer receives).

Each bundle is copied to ``tmp/model/<name>`` (the app's model folder layout) with random weights as
``models/model.pt``; the copy's configs get a smaller network/roi (listed in SMALL) because MONAI Label reads the
config files as they are, with no command-line overrides. Nothing is written into ``bundles/``.

Known incompatibility (upstream): MONAI 1.6's ``Spacingd`` updates every ``image_*`` entry of the data dict as a
metadata dict, and MONAI Label 0.8.5 puts the ``image_path`` string there, so on MONAI >= 1.6 every NIfTI bundle with
``Spacingd`` fails in MONAI Label (see ``test_monai16_spacingd_meets_monai_label_image_path``). The other tests
hide ``image_path`` from the pre-transforms on MONAI >= 1.6, to check everything else.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigItem, ConfigParser, create_workflow
from monai.data import partition_dataset
from monai.inferers import SimpleInferer
from monai.transforms import Compose, LoadImaged, Resize, SaveImaged
from monai.utils import InterpolateMode

from make_demo_data import make_case  # tools/ is on sys.path (conftest.py)
from medseg_nets.utils import get_device

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ["dalight3d", "glims", "emcad"]
MONAI_16 = tuple(int(x) for x in monai.__version__.split("+")[0].split(".")[:2]) >= (1, 6)

try:  # the real classes, when monailabel is installed beside this MONAI
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask
except ImportError:
    BundleInferTask = BundleTrainTask = None

# ids set in the copied configs (MONAI Label reads configs as they are): narrow networks, small rois, no workers;
# val_interval 2 so that the one training epoch does not validate; a few sliding windows a volume
SMALL = {
    "dalight3d": {"roi_size": [32, 32, 32], "sw_overlap": 0.25, "sw_batch_size": 2, "num_workers": 0, "val_interval": 2,
                  "network_def#base_channels": 8, "network_def#bottleneck_channels": 32},
    "glims": {"roi_size": [32, 32, 32], "sw_batch_size": 2, "num_workers": 0, "val_interval": 2,
              "network_def#feature_size": 3},
    "emcad": {"roi_size": [64, 64], "sw_batch_size": 16, "num_workers": 0, "val_interval": 2, "num_samples": 2,
              "network_def#encoder": "pvt_v2_b0"},
}
# values the postprocessing can write into the label map: argmax of 4 softmax channels (MSD labels); TC/WT/ET
# regions -> BraTS 2021 labels (1 necrotic core, 2 edema, 4 enhancing: RegionsToBraTSLabeld's default convention,
# as MONAI Label's request carries no ``brats_convention``)
LABEL_MAP_VALUES = {"dalight3d": {1, 2, 3}, "glims": {1, 2, 4}, "emcad": {1, 2, 4}}
SIZE = (32, 32, 24)
# LPS-flipped, anisotropic and translated: Orientationd/Spacingd change the grid, Invertd must bring it back
AFFINE = np.array([[-1.2, 0, 0, 90.0], [0, -1.0, 0, 110.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])


# ---------------------------------------------------------------- monailabel/utils/others/generic.py (0.8.5)
def device_list() -> list[str]:
    devices = [] if torch.cuda.is_available() else ["cpu"]
    if torch.cuda.device_count() == 1:
        devices.append(torch.cuda.get_device_name(0))
    else:
        devices += [f"{torch.cuda.get_device_name(i)}:{i}" for i in range(torch.cuda.device_count())]
    return devices


def device_map() -> dict[str, str]:
    devices = {} if torch.cuda.is_available() else {"cpu": "cpu"}
    if torch.cuda.device_count() == 1:
        devices[torch.cuda.get_device_name(0)] = "cuda"
    else:
        devices.update({f"{torch.cuda.get_device_name(i)}:{i}": f"cuda:{i}" for i in range(torch.cuda.device_count())})
    return devices


def name_to_device(device) -> str:
    device = device if device else "cuda" if torch.cuda.is_available() else "cpu"
    device = device if isinstance(device, str) else device[0]
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    return device_map().get(device, device)


# ---------------------------------------------------------------- tasks/infer/bundle.py + basic_infer.py (0.8.5)
class _InferTask:
    """``BundleInferTask(path, conf={})`` (segmentation type, default pre/post filters) and its ``__call__``."""

    def __init__(self, path: str, conf: dict) -> None:
        configs = [c for c in ("inference.json", "inference.yaml") if (Path(path) / "configs" / c).exists()]
        assert configs, "BundleInferTask ignores a bundle without configs/inference.json"
        self.bundle_path = path
        self.bundle_config = ConfigParser()
        self.bundle_config.read_config(str(Path(path) / "configs" / configs[0]))
        self.bundle_config.config.update({"bundle_root": path})
        self.bundle_config.config["use_click"] = False
        model_path = Path(path) / "models" / "model.pt"
        assert model_path.exists(), "without models/model.pt (or model.ts) BundleInferTask ignores the bundle"
        self.path = str(model_path)
        self.network = self.bundle_config.get_parsed_content("network_def", instantiate=True)
        metadata = json.loads((Path(path) / "configs" / "metadata.json").read_text())
        self.key_image, image = next(iter(metadata["network_data_format"]["inputs"].items()))
        self.key_pred, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
        self.labels = {v.lower(): int(k) for k, v in pred.get("channel_def", {}).items() if v.lower() != "background"}
        spatial_shape = image.get("spatial_shape")
        self.dimension = len(spatial_shape) if spatial_shape else 3
        self.description = metadata.get("description")
        self.version = metadata.get("version")
        self.load_strict = False
        self._config = {"device": device_list(), "model_filename": ["model.pt"]}
        self.valid = True

    def is_valid(self) -> bool:
        return self.valid

    def _update_device(self, data) -> None:
        device = data.get("device") if data else None
        if device:
            self.bundle_config.config.update({"device": device})
            if self.bundle_config.ref_resolver.items.get("device"):
                self.bundle_config.ref_resolver.items["device"] = ConfigItem(config=device, id="device")

    def _compose(self, keys) -> list:
        out = []
        for k in keys:
            if self.bundle_config.get(k):
                c = self.bundle_config.get_parsed_content(k, instantiate=True)
                out = list(c.transforms) if isinstance(c, Compose) else c
        return out

    def pre_transforms(self, data) -> list:
        self._update_device(data)
        pre = self._compose(("preprocessing", "pre_transforms"))  # pre_filter None
        for t in pre:
            if isinstance(t, LoadImaged):
                t._loader.image_only = False
        # extend_load_image wraps each LoadImaged in LoadImageTensord, which for a file path (str) calls it as is
        return pre

    def inferer(self, data):
        self._update_device(data)
        i = None
        if self.bundle_config.get("inferer"):
            i = self.bundle_config.get_parsed_content("inferer", instantiate=True)
        return i if i is not None else SimpleInferer()

    def post_transforms(self, data) -> list:
        self._update_device(data)
        post = [t for t in self._compose(("postprocessing", "post_transforms")) if not isinstance(t, SaveImaged)]
        post.append(self._restored)  # Restored(keys=key_pred, ref_image=key_image)
        return post

    def _restored(self, d: dict) -> dict:
        """``monailabel.transform.post.Restored`` (has_channel=True, invert_orient=False, no config_labels)."""
        d = dict(d)
        ref = d[self.key_image]
        meta = ref.meta if isinstance(ref, monai.data.MetaTensor) else d.get(f"{self.key_image}_meta_dict", {})
        result = d[self.key_pred]
        current_size = result.shape[1:]
        spatial_size = meta.get("spatial_shape", current_size)[-len(current_size):]
        if np.any(np.not_equal(current_size, spatial_size)):
            result = Resize(spatial_size=spatial_size, mode=InterpolateMode.NEAREST)(result)
        d[self.key_pred] = result if len(result.shape) <= 3 else result[0] if result.shape[0] == 1 else result
        pred_meta = d.get(f"{self.key_pred}_meta_dict")
        if pred_meta is None:
            pred_meta = d[f"{self.key_pred}_meta_dict"] = {}
        pred_meta["affine"] = meta.get("original_affine")
        return d

    def _get_network(self, device: str):
        network = copy.deepcopy(self.network).to(torch.device(device))
        checkpoint = torch.load(self.path, map_location=torch.device(device))
        state = checkpoint.get("model", checkpoint)
        network.load_state_dict(state, strict=self.load_strict)  # MONAI Label only warns about mismatched keys
        return network.eval()

    def run_pre_transforms(self, data, transforms):
        for t in transforms:  # run_transforms(..., use_compose=False)
            data = t(data)
        return data

    def __call__(self, request: dict):
        req = copy.deepcopy(self._config)
        req.update(request)
        device = name_to_device(req.get("device", "cuda"))
        req["device"] = device
        data = copy.deepcopy(req)
        data.update({"image_path": req.get("image")})
        pre = self.pre_transforms(data)
        data = self.run_pre_transforms(data, pre)
        inferer = self.inferer(data)
        network = self._get_network(device)
        inputs = data["image"]
        inputs = (inputs if torch.is_tensor(inputs) else torch.from_numpy(inputs))[None].to(torch.device(device))
        with torch.no_grad():
            outputs = inferer(inputs, network)
        data["pred"] = outputs[0]
        # inverse_transforms() is None for bundles: no separate invert step
        for t in self.post_transforms(data):
            data = t(data)
        if req.get("skip_writer"):
            return None, dict(data)
        raise NotImplementedError("the itk writer is not reproduced")


def _hiding_image_path(cls):
    """On MONAI >= 1.6 keep ``image_path`` out of the pre-transforms (see the module docstring)."""

    class Task(cls):
        def run_pre_transforms(self, data, transforms):
            if not MONAI_16:
                return super().run_pre_transforms(data, transforms)
            path = data.pop("image_path", None)
            data = super().run_pre_transforms(data, transforms)
            data["image_path"] = path
            return data

    return Task


# ---------------------------------------------------------------- tasks/train/bundle.py (0.8.5)
def _train(path: str, request: dict, datalist: list[dict]):
    """``BundleTrainTask(path, conf={})(request, datastore)`` on one device; returns the workflow it ran."""
    bundle_config = ConfigParser()
    bundle_config.read_config(str(Path(path) / "configs" / "train.json"))
    bundle_config.config.update({"bundle_root": path})
    ds = [{"image": d["image"], "label": d["label"]} for d in datalist if d]
    val_split = request.get("val_split", 0.2)
    if val_split > 0.0:
        train_ds, val_ds = partition_dataset(ds, ratios=[(1 - val_split), val_split], shuffle=False)
    else:
        train_ds, val_ds = ds, None if val_split < 0 else []
    device = name_to_device(request.get("device", "cuda"))
    train_handlers = bundle_config.get("train#handlers", [])
    model_pytorch = Path(path) / "models" / request.get("model_filename", "model.pt")
    if request.get("pretrained", True) and model_pytorch.exists():
        if not [t for t in train_handlers if t.get("_target_") == "CheckpointLoader"]:
            train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(model_pytorch),
                                      "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {
        "bundle_root": path,
        "train#trainer#max_epochs": request.get("max_epochs", 50),
        "train#dataset#data": train_ds,
        "device": device,
        "train#handlers": train_handlers,
    }
    if val_ds is not None:
        overrides["validate#dataset#data"] = val_ds
    # run_single_gpu: monai.bundle.run(run_id, init_id=None, final_id=None, meta_file, config_file, **overrides),
    # which is create_workflow(...), .run(), .finalize()
    workflow = create_workflow(config_file=str(Path(path) / "configs" / "train.json"),
                               meta_file=str(Path(path) / "configs" / "metadata.json"),
                               run_id=request.get("run_id", "run"), init_id=None, final_id=None, **overrides)
    workflow.run()
    workflow.finalize()
    return workflow, train_ds, val_ds


class _Datastore:
    """The one method of ``monailabel.interfaces.datastore.Datastore`` the train task calls."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def datalist(self) -> list[dict]:
        return self.items


# ---------------------------------------------------------------- fixtures
def _bundle_copy(root: Path, name: str) -> Path:
    """``<root>/model/<name>``: the bundle with SMALL set in its configs and random weights as models/model.pt."""
    dst = root / "model" / name
    shutil.copytree(ROOT / "bundles" / name, dst, ignore=shutil.ignore_patterns("eval", "*.pt", "*.ts"))
    for config in ("inference.json", "train.json"):
        f = dst / "configs" / config
        parser = ConfigParser()
        parser.read_config(str(f))
        for key, value in SMALL[name].items():
            if key.split("#")[0] in parser.config:  # val_interval/num_samples are train-only ids
                assert parser.get(key) is not None, f"{name}/{config} has no id {key}"
                parser[key] = value
        ConfigParser.export_config_file(parser.config, str(f), indent=4)
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["bundle_root"] = str(dst)
    torch.manual_seed(1234)
    (dst / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), dst / "models" / "model.pt")
    return dst


def _volume(path: Path, seed: int, name: str, label_path: Path | None = None) -> None:
    """A 4-channel 4D NIfTI (one file a study, as MONAI Label's datastore serves it) and optionally its label."""
    image, msd_label = make_case(np.random.default_rng(seed), SIZE)
    nib.save(nib.Nifti1Image(image, AFFINE), path)
    if label_path is not None:
        lut = [0, 1, 2, 3] if name == "dalight3d" else [0, 2, 1, 4]  # MSD -> BraTS 2021 for glims/emcad
        label = np.choose(msd_label, np.array(lut, np.uint8)).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, AFFINE), label_path)


@pytest.fixture(scope="module", params=BUNDLES)
def inferred(request, tmp_path_factory):
    """One MONAI Label inference on a generated volume: (name, task, request image, result data)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"monailabel_{name}")
    bundle = _bundle_copy(root, name)
    image = root / "study.nii.gz"
    _volume(image, 0, name)
    cls = _hiding_image_path(BundleInferTask if BundleInferTask is not None else _InferTask)
    task = cls(str(bundle), {})
    _, data = task({"model": name, "image": str(image), "skip_writer": True})
    return name, task, image, data


# ---------------------------------------------------------------- tests
def test_infer_task_reads_the_bundle(inferred):
    name, task, _, _ = inferred
    meta = json.loads((ROOT / "bundles" / name / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert task.is_valid()
    assert task.labels == {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    # emcad's metadata describes the 2D network (MONAI Label then reports dimension 2; Slicer only uses it for
    # deepgrow models, epistemic scoring for its tensor layout)
    assert task.dimension == (2 if name == "emcad" else 3)


def test_one_inference_gives_a_label_map_in_the_studys_space(inferred):
    name, _, image, data = inferred
    pred = data["pred"]
    assert tuple(pred.shape) == SIZE  # Invertd undid crop/spacing/orientation; Restored dropped the channel
    np.testing.assert_allclose(np.asarray(data["pred_meta_dict"]["affine"]), nib.load(image).affine, atol=1e-4)
    values = set(torch.unique(torch.as_tensor(pred)).tolist())
    assert values <= {0} | LABEL_MAP_VALUES[name], values


REGION_LABELS = pytest.mark.xfail(strict=True, reason=(
    "MONAI Label names segments from metadata outputs.pred.channel_def, which for the region networks lists "
    "the sigmoid channels (tc=0, wt=1, et=2), while the label map holds BraTS values 1/2/4"))


@pytest.mark.parametrize("name", ["dalight3d", *[pytest.param(n, marks=REGION_LABELS) for n in ("glims", "emcad")]])
def test_reported_labels_name_the_label_map_values(name):
    pred = json.loads((ROOT / "bundles" / name / "configs" / "metadata.json").read_text())
    pred = pred["network_data_format"]["outputs"]["pred"]
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    assert set(labels.values()) == LABEL_MAP_VALUES[name]


@pytest.mark.parametrize("name", BUNDLES)
def test_loader_follows_image_only_switched_off(name, tmp_path):
    """BundleInferTask sets ``_loader.image_only = False`` on every LoadImaged of ``preprocessing`` and expects
    LoadImaged's behaviour then: the image under its key and the metadata under ``<key>_meta_dict``."""
    _volume(tmp_path / "study.nii.gz", 0, name)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / name / "configs" / "inference.json"))
    loaders = [t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, LoadImaged)]
    assert len(loaders) == 1
    loaders[0]._loader.image_only = False
    d = loaders[0]({"image": str(tmp_path / "study.nii.gz")})
    assert isinstance(d["image"], monai.data.MetaTensor), f"{type(loaders[0]).__name__} stored {type(d['image'])}"
    assert tuple(d["image"].shape) == (*SIZE, 4) and "original_affine" in d["image_meta_dict"]


@pytest.mark.xfail(MONAI_16, strict=True, raises=AttributeError, reason=(
    "MONAI 1.6 Spacingd calls .update() on every 'image_*' item; MONAI Label 0.8.5 adds the str 'image_path'"))
def test_monai16_spacingd_meets_monai_label_image_path(tmp_path):
    bundle = _bundle_copy(tmp_path, "dalight3d")
    _volume(tmp_path / "study.nii.gz", 0, "dalight3d")
    task = (BundleInferTask or _InferTask)(str(bundle), {})
    data = {"image": str(tmp_path / "study.nii.gz"), "image_path": str(tmp_path / "study.nii.gz"), "device": "cpu"}
    out = task.run_pre_transforms(data, task.pre_transforms(data))
    assert out["image"].shape[0] == 4


@pytest.mark.parametrize("name", BUNDLES)
def test_train_task_runs_one_epoch_from_the_datastore(name, tmp_path):
    bundle = _bundle_copy(tmp_path, name)
    pretrained = torch.load(bundle / "models" / "model.pt")
    items = []
    for i in range(2):
        items.append({"image": str(tmp_path / f"s{i}.nii.gz"), "label": str(tmp_path / f"s{i}_label.nii.gz")})
        _volume(Path(items[-1]["image"]), i + 1, name, Path(items[-1]["label"]))
    request = {"model": name, "max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
    if BundleTrainTask is not None:
        task = BundleTrainTask(str(bundle), {})
        assert task.is_valid()
        task(request, _Datastore(items))
    else:
        workflow, train_ds, val_ds = _train(str(bundle), request, _Datastore(items).datalist())
        assert workflow.parser.get_parsed_content("train#dataset").data == train_ds == items[:1]
        assert workflow.parser.get_parsed_content("validate#dataset").data == val_ds == items[1:]
        assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 1
    trained = torch.load(bundle / "models" / "checkpoint_latest.pt")["network"]
    # MONAI Label put a CheckpointLoader for models/model.pt first: training went on from those weights
    num = sum(float((trained[k].float() - v.float()).norm()) for k, v in pretrained.items() if v.is_floating_point())
    den = sum(float(v.float().norm()) for v in pretrained.values() if v.is_floating_point())
    assert num / den < 0.2, num / den


@pytest.mark.parametrize("name", BUNDLES)
def test_multi_gpu_merge_gives_each_rank_its_own_device(name, tmp_path):
    """With more than one GPU the train task exports train.json with its overrides (device "cuda") as
    configs/monailabel_train.json and runs torchrun with [that, multi_gpu_train.json]: the latter must set device."""
    bundle = tmp_path / name
    shutil.copytree(ROOT / "bundles" / name / "configs", bundle / "configs")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    for k, v in {"bundle_root": str(bundle), "train#trainer#max_epochs": 1, "device": "cuda"}.items():
        parser.set(v, k)
    ConfigParser.export_config_file(parser.config, str(bundle / "configs" / "monailabel_train.json"), indent=2)
    merged = ConfigParser()
    merged.read_config([str(bundle / "configs" / c) for c in ("monailabel_train.json", "multi_gpu_train.json")])
    assert merged.config["device"] != "cuda"
    assert merged.get_parsed_content("device") == get_device()
