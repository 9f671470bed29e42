"""Engine outputs against ONNX Runtime on the CPU, with the ONNX exporter's near-tie handling for the heatmap.

The shipped model's heatmap is 3x3 peak-suppressed inside the graph (``heatmap = p * (maxpool(p) == p)``). That is
discontinuous: where a cell and its best neighbour are within a rounding error, two runtimes may keep different
cells (a "peak flip") and the heatmap differs there by a whole probability, though both are right. So, as
:func:`exporters.onnx.check_parity` does for ONNX Runtime vs PyTorch, the heatmap is compared only where both
made the same keep/drop decision, the flips are counted, and every flip must be a near-tie: the reference's
|cell - best neighbour| *before* suppression (read from the model with that tensor exposed as an extra output,
:func:`with_raw_heatmap`) must be within a tolerance. Other outputs are compared everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporters.onnx import _tie_gaps

RAW_HEATMAP = "raw_heatmap_before_suppression"


def with_raw_heatmap(onnx_path: Path, heatmap: str = "heatmap") -> bytes | None:
    """The model with the heatmap's input to peak suppression (the ``X`` of ``Mul(X, Cast(Equal(MaxPool(X), X)))``)
    exposed as the extra output :data:`RAW_HEATMAP`, serialised; None when the graph has no such pattern."""
    import onnx

    model = onnx.load(str(onnx_path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    mul = producer.get(heatmap)
    if mul is None or mul.op_type != "Mul":
        return None
    pooled = {n.input[0] for n in graph.node if n.op_type == "MaxPool"}
    raw = next((x for x in mul.input if x in pooled), None)
    out = next((o for o in graph.output if o.name == heatmap), None)
    if raw is None or out is None:
        return None
    # An Identity gives the tensor a stable name of our own, whatever the exporter called it; same type and shape
    # as the heatmap output.
    graph.node.append(onnx.helper.make_node("Identity", [raw], [RAW_HEATMAP]))
    named = onnx.ValueInfoProto()
    named.CopyFrom(out)
    named.name = RAW_HEATMAP
    graph.output.append(named)
    return bytes(model.SerializeToString())


@dataclass
class OutputParity:
    """Accumulated over batches: per output the largest |got - want| (the heatmap's where both runtimes agree on
    keep/drop), the peak flips, and the largest reference tie gap at a flip."""

    names: list[str]
    heatmap: str | None = "heatmap"
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    mean_abs_diff: dict[str, float] = field(default_factory=dict)  # over all cells (flips included)
    peak_flips: int = 0
    cells: int = 0
    max_tie_gap: float = 0.0
    ties_explained: bool = True  # False once a flip was seen without the raw heatmap to check it
    _seen: dict[str, tuple[int, float]] = field(default_factory=dict, repr=False)

    def add(self, got: list[np.ndarray], want: list[np.ndarray], raw: np.ndarray | None) -> None:
        """One batch: ``got``/``want`` in ``names`` order; ``raw`` the reference's heatmap before suppression."""
        for name, g, w in zip(self.names, got, want, strict=True):
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            n, total = self._seen.get(name, (0, 0.0))
            self._seen[name] = (n + diff.size, total + float(diff.sum()))
            self.mean_abs_diff[name] = self._seen[name][1] / max(1, self._seen[name][0])
            if name == self.heatmap:
                flip = (g > 0) != (w > 0)
                self.peak_flips += int(flip.sum())
                self.cells += int(flip.size)
                diff = diff[~flip]
                if flip.any():
                    if raw is None:
                        self.ties_explained = False
                    else:
                        self.max_tie_gap = max(self.max_tie_gap, float(_tie_gaps(raw, np.argwhere(flip)).max()))
            worst = float(diff.max()) if diff.size else 0.0
            self.max_abs_diff[name] = max(self.max_abs_diff.get(name, 0.0), worst)

    def ok(self, tolerance: float, tie_tolerance: float) -> bool:
        """Every output within ``tolerance`` and every peak flip a near-tie within ``tie_tolerance``."""
        diffs_ok = all(v <= tolerance for v in self.max_abs_diff.values())
        return diffs_ok and (self.peak_flips == 0 or (self.ties_explained and self.max_tie_gap <= tie_tolerance))

    def summary(self) -> str:
        diffs = ", ".join(
            f"{k} {v:.3g} (mean {self.mean_abs_diff.get(k, 0.0):.2g})" for k, v in self.max_abs_diff.items()
        )
        flips = f"peak flips {self.peak_flips}/{self.cells} cells"
        if self.peak_flips:
            flips += f" (largest tie gap {self.max_tie_gap:.2g})" if self.ties_explained else " (not explained)"
        return f"max |diff| {diffs}; {flips}"


class Reference:
    """ONNX Runtime (CPU EP) on the source model, plus the raw heatmap where the graph has peak suppression."""

    def __init__(self, onnx_path: Path, output_names: list[str]) -> None:
        import onnxruntime as ort

        self.names = output_names
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        raw_model = with_raw_heatmap(onnx_path) if "heatmap" in output_names else None
        self.raw = ort.InferenceSession(raw_model, providers=["CPUExecutionProvider"]) if raw_model else None
        self.input_name = self.session.get_inputs()[0].name

    def run(self, chips: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Reference outputs (in ``output_names`` order) and the raw heatmap (or None) for ``chips``."""
        feed = {self.input_name: np.ascontiguousarray(chips, np.float32)}
        want = [np.asarray(o) for o in self.session.run(self.names, feed)]
        raw = np.asarray(self.raw.run([RAW_HEATMAP], feed)[0]) if self.raw is not None else None
        return want, raw
