"""Engine parity with the ONNX exporter's near-tie handling: peak flips at rounding-level ties are accepted and
counted; a flip that is not a near-tie, or a real difference, fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporters.parity import OutputParity, Reference, with_raw_heatmap

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "snipserve_default.onnx"

pytest.importorskip("onnx", reason="needs onnx (cpu/export extra)")


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference(SHIPPED, ["heatmap", "ltrb"])


def chips(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 256, 256)).astype(np.float32)


def test_raw_heatmap_is_the_input_of_peak_suppression(reference: Reference) -> None:
    want, raw = reference.run(chips(2))
    assert raw is not None and raw.shape == want[0].shape
    kept = want[0] > 0
    np.testing.assert_array_equal(want[0][kept], raw[kept])  # kept cells are the raw probabilities
    assert (raw[~kept] > 0).any()  # suppressed ones are not zero before suppression


def test_graph_without_peak_suppression_has_no_raw_heatmap(tmp_path: Path) -> None:
    from tests.service.engines.test_engines import identity_model

    assert with_raw_heatmap(identity_model(tmp_path, "RGB"), heatmap="out") is None


def flip_one(heat: np.ndarray, raw: np.ndarray, near: bool) -> np.ndarray:
    """A copy of ``heat`` where one kept peak is dropped in favour of a neighbour: at the nearest tie of the
    batch (``near``) or at the clearest peak (not a tie)."""
    from exporters.onnx import _tie_gaps

    kept = np.argwhere(heat > 0)
    gaps = _tie_gaps(raw, kept)
    b, k, y, x = kept[int(np.argmin(gaps) if near else np.argmax(gaps))]
    out = heat.copy()
    out[b, k, y, x] = 0.0
    return out


def test_near_tie_flips_are_accepted_and_counted(reference: Reference) -> None:
    x = chips(4, seed=1)
    want, raw = reference.run(x)
    assert raw is not None
    got = [flip_one(want[0], raw, near=True), want[1] + 1e-4]
    parity = OutputParity(["heatmap", "ltrb"])
    parity.add(got, want, raw)
    assert parity.peak_flips == 1 and parity.max_tie_gap < 1e-2
    assert parity.ok(tolerance=1e-3, tie_tolerance=1e-2), parity.summary()
    assert "peak flips 1/" in parity.summary()
    # Without the near-tie handling the whole probability of the flipped cell would count as a difference:
    assert not parity.ok(tolerance=1e-3, tie_tolerance=parity.max_tie_gap / 2)


def test_a_flip_that_is_no_tie_or_a_real_difference_fails(reference: Reference) -> None:
    want, raw = reference.run(chips(2, seed=2))
    assert raw is not None
    clear = OutputParity(["heatmap", "ltrb"])
    clear.add([flip_one(want[0], raw, near=False), want[1]], want, raw)
    assert clear.peak_flips == 1 and not clear.ok(1e-3, 1e-2), clear.summary()
    shifted = OutputParity(["heatmap", "ltrb"])
    shifted.add([want[0], want[1] + 0.01], want, raw)
    assert shifted.peak_flips == 0 and not shifted.ok(1e-3, 1e-2)
    unexplained = OutputParity(["heatmap", "ltrb"])
    unexplained.add([flip_one(want[0], raw, near=True), want[1]], want, None)
    assert not unexplained.ok(1e-3, 1.0) and "not explained" in unexplained.summary()
