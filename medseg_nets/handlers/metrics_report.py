"""Write per-case and summary segmentation metrics, with named channels, to files."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import string_list_all_gather

from medseg_nets.transforms.checks import source_name
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_write_json, atomic_write_text

__all__ = ["MetricsReport", "summarise"]


def _clean(v: float) -> float | None:
    return None if (math.isnan(v) or math.isinf(v)) else round(v, 6)


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean/std/median over the finite values; NaN (metric undefined, e.g. empty ground truth) and infinite
    values (e.g. HD95 of an empty prediction) are counted, not averaged."""
    finite = [v for v in values if not (math.isnan(v) or math.isinf(v))]
    t = torch.tensor(finite, dtype=torch.float64)
    return {
        "mean": _clean(float(t.mean())) if finite else None,
        "std": _clean(float(t.std(unbiased=False))) if finite else None,
        "median": _clean(float(t.median())) if finite else None,
        "n": len(finite),
        "n_nan": sum(math.isnan(v) for v in values),
        "n_inf": sum(math.isinf(v) for v in values),
    }


class MetricsReport:
    """Write ``<prefix>.json`` (summary + per case), ``<prefix>.csv`` (one row per case) and ``<prefix>.md``
    (summary table) to ``output_dir`` when an evaluator finishes.

    ``metrics`` maps a metric name in ``engine.state.metric_details`` (MONAI metric handlers with
    ``save_details=True``) to the names of its channels, e.g.
    ``{"val_region_dice": ["WT", "TC", "ET"], "val_region_hd95": ["WT", "TC", "ET"]}``.
    Case names come from the image's ``filename_or_obj``; under DDP they are gathered from every rank (the metric
    buffers already are) and rank 0 writes.
    """

    def __init__(
        self,
        output_dir: str,
        metrics: Mapping[str, Sequence[str]],
        prefix: str = "metrics",
        image_key: str = "image",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metrics = {k: list(v) for k, v in metrics.items()}
        self.prefix = prefix
        self.image_key = image_key
        self._names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect_names(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            img = item[self.image_key] if isinstance(item, Mapping) else item
            meta = getattr(img, "meta", {})
            names = meta.get("filename_or_obj", None) if isinstance(meta, Mapping) else None
            if isinstance(names, (list, tuple)):
                self._names.extend(str(n) for n in names)
            else:
                self._names.append(source_name(img, default=f"case_{len(self._names)}"))

    def report(self, engine: Engine) -> dict[str, Any]:
        """The report as a dict (also what :meth:`__call__` writes)."""
        details = getattr(engine.state, "metric_details", {})
        names = string_list_all_gather(self._names) if torch.distributed.is_initialized() else list(self._names)
        summary: dict[str, Any] = {}
        cases = [{"image": n} for n in names]
        for metric, channels in self.metrics.items():
            if metric not in details:
                raise KeyError(f"MetricsReport: '{metric}' not in metric_details {sorted(details)} (save_details=True?)")
            values = torch.as_tensor(details[metric]).float().reshape(len(names), -1)
            if values.shape[1] != len(channels):
                raise ValueError(f"MetricsReport: {metric} has {values.shape[1]} channels, names given: {channels}")
            summary[metric] = {ch: summarise(values[:, i].tolist()) for i, ch in enumerate(channels)}
            for case, row in zip(cases, values.tolist()):
                case[metric] = {ch: _clean(v) for ch, v in zip(channels, row)}
        return {
            "epoch": int(engine.state.epoch),
            "n_cases": len(names),
            "summary": summary,
            "key_metrics": {k: _clean(float(v)) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))},
            "cases": cases,
        }

    def __call__(self, engine: Engine) -> None:
        report = self.report(engine)
        if get_rank() != 0:
            return
        atomic_write_json(self.output_dir / f"{self.prefix}.json", report)
        buf = io.StringIO()
        cols = [(m, ch) for m, chs in self.metrics.items() for ch in chs]
        writer = csv.writer(buf)
        writer.writerow(["image"] + [f"{m}/{ch}" for m, ch in cols])
        for case in report["cases"]:
            writer.writerow([case["image"]] + ["" if case[m][ch] is None else case[m][ch] for m, ch in cols])
        atomic_write_text(self.output_dir / f"{self.prefix}.csv", buf.getvalue())
        atomic_write_text(self.output_dir / f"{self.prefix}.md", self.markdown(report))

    def markdown(self, report: Mapping[str, Any]) -> str:
        """Summary table: one row per metric, one column per channel, ``mean ± std`` over cases."""
        lines = [f"Cases: {report['n_cases']} (epoch {report['epoch']})", ""]
        for metric, channels in self.metrics.items():
            lines += [f"| {metric} | " + " | ".join(channels) + " |", "|---" * (len(channels) + 1) + "|"]
            cells = []
            for ch in channels:
                s = report["summary"][metric][ch]
                cell = "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
                if s["n_inf"]:
                    cell += f" ({s['n_inf']} inf)"
                cells.append(cell)
            lines += [f"| mean ± std | " + " | ".join(cells) + " |", ""]
        return "\n".join(lines)
