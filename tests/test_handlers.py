"""Unit tests of the handlers, writers and utilities the bundles share (tiny ignite engines, no bundle)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

import medseg_nets.handlers.checkpoint as checkpoint_module
from medseg_nets.data import NiftiLikeInputWriter, seeded_split
from medseg_nets.handlers import (
    BestModelSaver,
    CheckpointLoader,
    CheckpointSaver,
    GradientClipping,
    MetricsReport,
    ResumeFromCheckpoint,
    summarise,
)
from medseg_nets.transforms import LabelsToChannelsd, labels_to_channels
from medseg_nets.utils import atomic_torch_save, atomic_write, atomic_write_json


def _leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted atomic write could leave behind."""
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name or p.name.startswith("."))


def _half_written_save(real_save):
    """A ``torch.save`` that writes half of the bytes and then 'crashes' (disk full, process killed...)."""

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError("simulated crash while writing")

    return save


# --------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_keeps_previous_file_when_the_write_crashes(tmp_path, error):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"epoch": 1})

    def crashing(tmp):
        Path(tmp).write_text('{"epoch": 2, "trunc')
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, crashing)
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_write_temp_name_keeps_suffixes_and_final_permissions(tmp_path):
    seen = []
    out = atomic_write(tmp_path / "sub" / "case_seg.nii.gz", lambda tmp: (seen.append(tmp), Path(tmp).write_bytes(b"x")))
    assert out == tmp_path / "sub" / "case_seg.nii.gz" and out.read_bytes() == b"x"
    assert seen[0].endswith(".nii.gz") and Path(seen[0]).parent == out.parent  # same filesystem: rename is atomic
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert _leftovers(out.parent) == []


def test_atomic_torch_save_crash_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    atomic_torch_save({"w": torch.ones(3), "epoch": 1}, path)
    monkeypatch.setattr(torch, "save", _half_written_save(torch.save))
    with pytest.raises(OSError, match="simulated crash"):
        atomic_torch_save({"w": torch.zeros(3), "epoch": 2}, path)
    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------- checkpoints, resume, best model (ignite)


class _Data(torch.utils.data.Dataset):
    """8 fixed samples of a linear regression problem, as dicts like the bundles' batches."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def _trainer(max_epochs: int, handlers=(), seed: int = 0, lr: float = 0.05):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)  # momentum: optimizer state that must be resumed
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    loader = DataLoader(_Data(), batch_size=2, shuffle=False, num_workers=0)  # 4 iterations per epoch
    objs = {"network": net, "optimizer": opt, "lr_scheduler": sched}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=torch.nn.MSELoss(), amp=False,
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    for h in handlers(objs) if callable(handlers) else handlers:
        h.attach(trainer)
    return trainer, objs


def test_checkpoint_saver_writes_latest_every_epoch_with_trainer_state(tmp_path):
    seen = []

    def record(engine):  # runs after the saver (attached later): what a crash right now would leave on disk
        ckpt = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
        seen.append((ckpt["trainer"]["iteration"], ckpt["trainer"]["epoch_length"]))

    trainer, objs = _trainer(3, lambda o: [CheckpointSaver(str(tmp_path), o)])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    trainer.run()
    assert seen == [(4, 4), (8, 4), (12, 4)]  # (iteration, epoch_length): epochs 1, 2, 3
    ckpt = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert set(ckpt) == {"network", "optimizer", "lr_scheduler", "trainer"}
    assert torch.equal(ckpt["network"]["weight"], objs["network"].weight)
    assert ckpt["optimizer"]["state"][0]["momentum_buffer"].shape == (1, 4)
    assert ckpt["lr_scheduler"]["last_epoch"] == 3
    assert _leftovers(tmp_path) == []


def test_checkpoint_saver_interval_final_and_rank(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(checkpoint_module, "atomic_torch_save", lambda obj, path: calls.append(obj["trainer"]["iteration"] // 4))
    trainer, _ = _trainer(3, lambda o: [CheckpointSaver(str(tmp_path), o, save_interval=2)])
    trainer.run()
    assert calls == [2, 3]  # every 2nd epoch, and the final state
    calls.clear()
    monkeypatch.setattr(checkpoint_module, "get_rank", lambda: 1)
    _trainer(1, lambda o: [CheckpointSaver(str(tmp_path), o)])[0].run()
    assert calls == []  # only global rank 0 writes
    with pytest.raises(ValueError, match="save_dict"):
        CheckpointSaver(str(tmp_path), {})


def test_checkpoint_saver_unwraps_data_parallel(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    CheckpointSaver(str(tmp_path), {"network": torch.nn.DataParallel(net)}, engine_key=None).attach(engine)
    engine.run([0], max_epochs=1)
    ckpt = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert set(ckpt["network"]) == {"weight", "bias"}  # no 'module.' prefix


def test_crash_loses_at_most_the_last_epoch_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    # reference: 4 epochs in one go
    ref, ref_objs = _trainer(4)
    ref.run()

    # run 1: the checkpoint write at the end of epoch 3 crashes half-way (process killed while saving)
    ckpt_dir = tmp_path / "models"
    real_save, n_saves = torch.save, []

    def save_crashing_third(obj, f, *args, **kwargs):
        n_saves.append(f)
        (_half_written_save(real_save) if len(n_saves) == 3 else real_save)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_crashing_third)
    run1, _ = _trainer(4, lambda o: [CheckpointSaver(str(ckpt_dir), o)])
    with pytest.raises(OSError, match="simulated crash"):
        run1.run()
    monkeypatch.setattr(torch, "save", real_save)
    assert _leftovers(ckpt_dir) == []
    ckpt = torch.load(ckpt_dir / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 8  # end of epoch 2: only epoch 3 is lost

    # run 2: new process, different initial weights; resumes at epoch 3 with optimizer and scheduler state
    epochs = []
    run2, objs = _trainer(
        4, lambda o: [ResumeFromCheckpoint(str(ckpt_dir), o, enabled="true"), CheckpointSaver(str(ckpt_dir), o)],
        seed=123,
    )
    run2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    run2.run()
    assert epochs == [3, 4]
    assert run2.state.iteration == 16 and run2.state.max_epochs == 4
    torch.testing.assert_close(objs["network"].weight, ref_objs["network"].weight)
    torch.testing.assert_close(objs["network"].bias, ref_objs["network"].bias)
    assert objs["lr_scheduler"].last_epoch == 4 and objs["optimizer"].param_groups[0]["lr"] == pytest.approx(0.05 * 0.7**4)
    torch.testing.assert_close(
        objs["optimizer"].state_dict()["state"][0]["momentum_buffer"],
        ref_objs["optimizer"].state_dict()["state"][0]["momentum_buffer"],
    )


def test_resume_disabled_missing_and_flag_parsing(tmp_path):
    net = torch.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match=f"resume requested but {tmp_path}/checkpoint_latest.pt does not exist"):
        ResumeFromCheckpoint(str(tmp_path), {"network": net}, enabled=True)
    for off in (False, "false", "0", "no", ""):
        assert not ResumeFromCheckpoint(str(tmp_path), {"network": net}, enabled=off).enabled
    with pytest.raises(ValueError, match="expected a boolean"):
        ResumeFromCheckpoint(str(tmp_path), {"network": net}, enabled="maybe")
    # disabled: attaching changes nothing
    before = net.weight.detach().clone()
    engine = Engine(lambda e, b: None)
    ResumeFromCheckpoint(str(tmp_path), {"network": net}).attach(engine)
    engine.run([0], max_epochs=1)
    assert torch.equal(net.weight, before)


def _evaluator(values, handler_factory):
    """An 'evaluator' whose metric at epoch k is values[k-1] and whose network weights equal k at epoch k."""
    net = torch.nn.Linear(1, 1, bias=False)
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e):
        e.state.metrics["dice"] = values[e.state.epoch - 1]
        with torch.no_grad():
            net.weight.fill_(e.state.epoch)

    saver = handler_factory(net)
    saver.attach(engine)
    return engine, saver


def test_best_model_saver_keeps_only_the_best_weights(tmp_path, monkeypatch):
    real, saved = checkpoint_module.atomic_torch_save, []
    monkeypatch.setattr(checkpoint_module, "atomic_torch_save", lambda obj, p: (saved.append(1), real(obj, p)))
    engine, saver = _evaluator([0.5, 0.7, float("nan"), 0.6], lambda n: BestModelSaver(str(tmp_path), n, "dice"))
    engine.run([0], max_epochs=4)
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(weights) == {"weight"} and weights["weight"].item() == 2.0  # epoch 2 had the best dice
    assert saver.state_dict() == {"best_metric": 0.7, "best_epoch": 2}
    assert len(saved) == 2  # written on improvement only (epochs 1 and 2); NaN never counts
    assert _leftovers(tmp_path) == []

    # a resumed run remembers the best value and does not overwrite a better model with a worse one
    engine, saver = _evaluator([0.65], lambda n: BestModelSaver(str(tmp_path), n, "dice"))
    saver.load_state_dict({"best_metric": 0.7, "best_epoch": 2})
    engine.run([0], max_epochs=1)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 2.0


def test_best_model_saver_lower_is_better_and_missing_metric(tmp_path):
    engine, saver = _evaluator([3.0, 1.0, 2.0], lambda n: BestModelSaver(str(tmp_path), n, "dice", "best.pt", False))
    engine.run([0], max_epochs=3)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["weight"].item() == 2.0 and saver.best_metric == 1.0
    engine, _ = _evaluator([0.5], lambda n: BestModelSaver(str(tmp_path), n, "hd95"))
    with pytest.raises(KeyError, match="metric 'hd95' not among"):
        engine.run([0], max_epochs=1)


def test_checkpoint_loader_names_missing_file_at_start_and_loads_weights(tmp_path):
    missing = tmp_path / "models" / "model.pt"
    net = torch.nn.Linear(2, 2)
    loader = CheckpointLoader(str(missing), {"model": net})  # building the workflow works without weights
    engine = Engine(lambda e, b: None)
    loader.attach(engine)
    with pytest.raises(FileNotFoundError, match=f"checkpoint {missing} not found: train the bundle first"):
        engine.run([0], max_epochs=1)
    src = torch.nn.Linear(2, 2)
    atomic_torch_save(src.state_dict(), missing)
    engine = Engine(lambda e, b: None)
    CheckpointLoader(str(missing), {"model": torch.nn.DataParallel(net)}).attach(engine)
    engine.run([0], max_epochs=1)
    assert torch.equal(net.weight, src.weight)


# ------------------------------------------------------------------------------------------ gradient clipping


def test_gradient_clipping_in_supervised_trainer():
    norms = []

    def after_clip(engine):
        grads = [p.grad for p in engine.network.parameters()]
        norms.append((engine.state.grad_norm, float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))))

    trainer, _ = _trainer(1, [GradientClipping(max_norm=0.5)], lr=0.0)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, after_clip)
    trainer.run()
    assert len(norms) == 4
    for before, after in norms:
        assert before > 0.5  # the targets are far from the initial predictions
        assert after == pytest.approx(0.5, rel=1e-4)


def test_gradient_clipping_unscales_amp_gradients_first():
    """With a GradScaler the gradients are unscaled before clipping; the scaler's step then uses them as they are."""
    net = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.tensor([[3.0, 0.0, 4.0]]), torch.tensor([[10.0]])

    def step(engine, batch):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).sum()  # d/dw = 2 * (0 - 10) * x = (-60, 0, -80): norm 100
        scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        scaler.step(opt)
        scaler.update()

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    engine.amp, engine.scaler, engine.optimizer = True, scaler, opt
    GradientClipping(max_norm=1.0).attach(engine)
    engine.run([0], max_epochs=1)
    assert engine.state.grad_norm == pytest.approx(100.0, rel=1e-5)  # unscaled norm, not 1024 * 100
    torch.testing.assert_close(net.weight.detach(), torch.tensor([[0.6, 0.0, 0.8]]))  # -lr * clipped gradient


# --------------------------------------------------------------------------------------------- split, writer


def test_seeded_split_is_deterministic_and_disjoint():
    items = [f"case_{i:02d}" for i in range(20)]
    train, val = seeded_split(items, 0.2, seed=3)
    assert (train, val) == seeded_split(list(items), 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert not set(train) & set(val) and sorted(train + val) == items
    assert seeded_split(items, 0.2, seed=4)[1] != val
    assert items == sorted(items)  # the input is not shuffled in place
    assert len(seeded_split(items[:3], 0.05, 0)[1]) == 1  # at least one validation case ...
    assert len(seeded_split(items[:2], 0.9, 0)[0]) == 1  # ... and at least one training case
    assert seeded_split(items, 0.0, 0) == (seeded_split(items, 0.0, 0)[0], []) and len(seeded_split(items, 0.0, 0)[0]) == 20
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            seeded_split(items, bad, 0)


def _source_nifti(path: Path) -> nib.Nifti1Image:
    """An oblique, anisotropic 4-channel image with a qform (code 1) and a different sform (code 2)."""
    c, s = math.cos(0.3), math.sin(0.3)
    qform = np.array([[-1.2 * c, -1.0 * s, 0, 90.0], [-1.2 * s, 1.0 * c, 0, 110.0], [0, 0, 1.6, -40.0], [0, 0, 0, 1]])
    sform = qform.copy()
    sform[0, 2] = 0.05  # a small shear only the sform can hold
    img = nib.Nifti1Image(np.random.default_rng(0).random((9, 8, 7, 4), dtype=np.float32), sform)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return nib.load(path)


def _write_prediction(src: Path | None, affine: np.ndarray, out: Path, shape=(9, 8, 7)) -> None:
    writer = NiftiLikeInputWriter(output_dtype=np.uint8)
    pred = torch.randint(0, 4, (1, *shape))
    writer.set_data_array(pred, channel_dim=0)
    meta = {"affine": torch.as_tensor(affine), "original_affine": torch.as_tensor(affine), "spatial_shape": shape}
    if src is not None:
        meta["filename_or_obj"] = str(src)
    writer.set_metadata(meta, resample=False)
    writer.write(out)


def test_nifti_like_input_writer_keeps_header_of_the_source(tmp_path):
    src = _source_nifti(tmp_path / "case.nii.gz")
    out = tmp_path / "pred" / "case_seg.nii.gz"
    _write_prediction(tmp_path / "case.nii.gz", src.affine.astype(np.float32), out)
    pred = nib.load(out)
    assert pred.shape == (9, 8, 7) and pred.get_data_dtype() == np.uint8
    assert np.array_equal(pred.affine, src.affine)  # bit for bit, not via a float32 round trip
    assert np.array_equal(pred.get_qform(), src.get_qform()) and np.array_equal(pred.get_sform(), src.get_sform())
    assert int(pred.header["qform_code"]) == 1 and int(pred.header["sform_code"]) == 2
    assert pred.header.get_xyzt_units() == ("mm", "sec")
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    assert _leftovers(out.parent) == []


def test_nifti_like_input_writer_without_matching_source(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    _write_prediction(None, affine, tmp_path / "a_seg.nii.gz")  # no source file: plain NibabelWriter behaviour
    src = _source_nifti(tmp_path / "case.nii.gz")
    _write_prediction(tmp_path / "case.nii.gz", affine, tmp_path / "b_seg.nii.gz")  # affine differs from the source
    _write_prediction(tmp_path / "case.nii.gz", src.affine, tmp_path / "c_seg.nii.gz", shape=(4, 4, 4))  # shape differs
    for name in ("a_seg.nii.gz", "b_seg.nii.gz"):
        np.testing.assert_allclose(nib.load(tmp_path / name).affine, affine)
    assert nib.load(tmp_path / "c_seg.nii.gz").shape == (4, 4, 4)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("with_source", [True, False])
def test_nifti_like_input_writer_is_atomic(tmp_path, monkeypatch, with_source):
    src = _source_nifti(tmp_path / "case.nii.gz")
    out = tmp_path / "out" / "case_seg.nii.gz"
    _write_prediction(tmp_path / "case.nii.gz", src.affine, out)
    before = out.read_bytes()
    real_save = nib.save

    def crash(img, filename, *args, **kwargs):
        real_save(img, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _write_prediction(tmp_path / "case.nii.gz" if with_source else None, src.affine, out)
    assert out.read_bytes() == before  # the previous complete prediction, not a truncated one
    assert _leftovers(out.parent) == []
    with pytest.raises(OSError, match="simulated crash"):
        _write_prediction(tmp_path / "case.nii.gz" if with_source else None, src.affine, out.with_name("new_seg.nii.gz"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["case_seg.nii.gz"]


# ------------------------------------------------------------------------------------------ metrics, labels


def test_metrics_report_writes_json_csv_md_with_cases_and_means(tmp_path):
    nan, inf = float("nan"), float("inf")
    dice = torch.tensor([[0.8, 0.6, nan], [0.6, 0.4, 0.5], [1.0, 0.5, 0.7]])
    hd95 = torch.tensor([[2.0, 3.0, inf], [4.0, 5.0, 6.0], [6.0, 1.0, 2.0]])
    names = ["/d/BRATS_001.nii.gz", "/d/BRATS_002.nii.gz", "/d/BRATS_003.nii.gz"]
    batches = [  # a collated batch of two and a batch of one, as a SupervisedEvaluator sees them
        {"image": MetaTensor(torch.zeros(2, 4, 2, 2, 2), meta={"filename_or_obj": names[:2]})},
        {"image": MetaTensor(torch.zeros(1, 4, 2, 2, 2), meta={"filename_or_obj": names[2:]})},
    ]
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metrics(e):
        e.state.metric_details = {"dice": dice, "hd95": hd95}
        e.state.metrics = {"dice": 0.6}

    report = MetricsReport(str(tmp_path), {"dice": ["WT", "TC", "ET"], "hd95": ["WT", "TC", "ET"]}, prefix="val")
    report.attach(engine)
    engine.run(batches, max_epochs=2)  # names are collected afresh each epoch

    out = json.loads((tmp_path / "val.json").read_text())
    assert out["epoch"] == 2 and out["n_cases"] == 3 and out["key_metrics"] == {"dice": 0.6}
    assert [c["image"] for c in out["cases"]] == names
    assert out["cases"][0]["dice"] == {"WT": 0.8, "TC": 0.6, "ET": None}
    assert out["summary"]["dice"]["WT"]["mean"] == pytest.approx(0.8)
    assert out["summary"]["dice"]["WT"]["median"] == pytest.approx(0.8)
    assert out["summary"]["dice"]["ET"] == {"mean": 0.6, "std": 0.1, "median": 0.5, "n": 2, "n_nan": 1, "n_inf": 0}
    assert out["summary"]["hd95"]["ET"]["mean"] == pytest.approx(4.0) and out["summary"]["hd95"]["ET"]["n_inf"] == 1
    rows = list(csv.reader((tmp_path / "val.csv").read_text().splitlines()))
    assert rows[0] == ["image"] + [f"{m}/{c}" for m in ("dice", "hd95") for c in ("WT", "TC", "ET")]
    assert rows[1] == [names[0], "0.8", "0.6", "", "2.0", "3.0", ""] and len(rows) == 4
    md = (tmp_path / "val.md").read_text()
    assert "Cases: 3 (epoch 2)" in md and "| dice | WT | TC | ET |" in md
    assert "0.8000 ± 0.1633" in md and "4.0000 ± 2.0000 (1 inf)" in md
    assert _leftovers(tmp_path) == []


def test_metrics_report_errors_and_summarise():
    engine = Engine(lambda e, b: None)
    engine.state.metric_details = {"dice": torch.ones(2, 2)}
    report = MetricsReport("unused", {"hd95": ["a"]})
    with pytest.raises(KeyError, match="save_details"):
        report.report(engine)
    report = MetricsReport("unused", {"dice": ["a", "b", "c"]})
    report._names[:] = ["x", "y"]
    with pytest.raises(ValueError, match="2 channels"):
        report.report(engine)
    assert summarise([float("nan"), float("inf")]) == {"mean": None, "std": None, "median": None, "n": 0, "n_nan": 1, "n_inf": 1}


def test_labels_to_channels_gives_brats_regions():
    label = MetaTensor(torch.tensor([0, 1, 2, 3, 3, 1]).reshape(1, 6, 1, 1), meta={"filename_or_obj": "lab.nii.gz"})
    out = LabelsToChannelsd(["label"], [[1, 2, 3], [2, 3], [3]], output_keys=["regions"])({"label": label})
    regions = out["regions"]
    assert regions.shape == (3, 6, 1, 1) and regions.dtype == torch.float32
    assert regions[:, :, 0, 0].tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]]  # WT, TC, ET
    assert isinstance(regions, MetaTensor) and regions.meta["filename_or_obj"] == "lab.nii.gz"
    assert out["label"] is label  # input kept
    per_label = labels_to_channels(torch.tensor([[0, 1, 2, 3]]), [[1], [2], [3]])
    assert per_label.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert (per_label.sum(0) <= 1).all()
    with pytest.raises(ValueError, match="one-channel"):
        labels_to_channels(torch.zeros(2, 3), [[1]])
    assert LabelsToChannelsd(["label"], [[1]], allow_missing_keys=True)({"x": 1}) == {"x": 1}
    with pytest.raises(KeyError):
        LabelsToChannelsd(["label"], [[1]])({"x": 1})
    with pytest.raises(ValueError, match="output_keys"):
        LabelsToChannelsd(["a", "b"], [[1]], output_keys=["c"])
