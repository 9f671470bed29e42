"""TensorRT engine backend: manifest checks and batch handling on any machine; the real engine on a GPU.

CPU-only machines test everything that does not touch the device: manifest round trip and validation,
version / compute-capability mismatch errors, the card from the manifest (and its sidecar override),
batch splitting and min-batch padding through a stub runner, and ``create_engine``'s lazy wiring.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from service.crop import Normalizer
from service.engines import EngineConfig, create_engine
from service.engines.fake import FAKE_CARD
from service.engines.manifest import (
    BatchProfile,
    EngineManifest,
    card_from_manifest,
    check_compatible,
    manifest_path,
    read_manifest,
    sha256_file,
    write_manifest,
)
from service.engines.tensorrt import Piece, TensorRTEngine, split_batch
from service.errors import ModelLoadError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("cupy") is not None


def make_manifest(**overrides: object) -> EngineManifest:
    fields: dict[str, object] = {
        "tensorrt_version": "10.13.0.35",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "precision": "fp16",
        "profile": BatchProfile(min_batch=1, opt_batch=8, max_batch=16),
        "input_name": "images",
        "output_names": ("out",),
        "onnx_file": "model.onnx",
        "onnx_sha256": "0" * 64,
        "card": FAKE_CARD.model_dump(mode="json", exclude_none=True),
        "workspace_mib": 1024,
    }
    fields.update(overrides)
    return EngineManifest.model_validate(fields)


# ---- manifest ------------------------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine")
    m = make_manifest()
    path = write_manifest(engine, m)
    assert path == tmp_path / "model.manifest.json" == manifest_path(engine)
    assert read_manifest(engine) == m
    assert card_from_manifest(engine, m) == FAKE_CARD


def test_sidecar_yaml_overrides_the_manifest_card(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    (tmp_path / "model.yaml").write_text("score_threshold: 0.55\n")
    card = card_from_manifest(engine, make_manifest())
    assert card.score_threshold == 0.55 and card.classes == FAKE_CARD.classes


def test_missing_or_broken_manifest_is_a_clear_error(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    with pytest.raises(ModelLoadError, match="no engine manifest model.manifest.json"):
        read_manifest(engine)
    manifest_path(engine).write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid engine manifest"):
        read_manifest(engine)
    manifest_path(engine).write_text(json.dumps({**make_manifest().model_dump(mode="json"), "precision": "int4"}))
    with pytest.raises(ModelLoadError, match="invalid engine manifest"):
        read_manifest(engine)


def test_profile_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(min_batch=4, opt_batch=2, max_batch=8)


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(ModelLoadError, match=r"built with TensorRT 10\.13\.0\.35, this host has 10\.14\.1\.48"):
        check_compatible(make_manifest(), tensorrt_version="10.14.1.48", compute_capability="9.0", gpu_name="x")


def test_compute_capability_mismatch_names_both_gpus() -> None:
    with pytest.raises(
        ModelLoadError, match=r"compute capability 9\.0 \(NVIDIA H100 80GB HBM3\), this GPU is 8\.9 \(L4\)"
    ):
        check_compatible(make_manifest(), tensorrt_version="10.13.0.35", compute_capability="8.9", gpu_name="L4")


def test_same_capability_other_gpu_is_a_warning() -> None:
    warnings = check_compatible(
        make_manifest(), tensorrt_version="10.13.0.35", compute_capability="9.0", gpu_name="NVIDIA H200"
    )
    assert len(warnings) == 1 and "NVIDIA H200" in warnings[0]
    assert (
        check_compatible(
            make_manifest(), tensorrt_version="10.13.0.35", compute_capability="9.0", gpu_name="NVIDIA H100 80GB HBM3"
        )
        == []
    )


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---- batch handling with a stub runner -------------------------------------------------------------------------


def test_split_batch() -> None:
    assert split_batch(10, 1, 4) == [Piece(0, 4, 4), Piece(4, 8, 4), Piece(8, 10, 2)]
    assert split_batch(3, 4, 8) == [Piece(0, 3, 4)]  # below min: padded to 4
    assert split_batch(9, 4, 8) == [Piece(0, 8, 8), Piece(8, 9, 4)]
    assert split_batch(0, 1, 8) == []
    with pytest.raises(ValueError):
        split_batch(4, 5, 4)


class StubRunner:
    """Row-wise deterministic "model": output[i] = per-chip mean and max (so misplaced rows are caught)."""

    def __init__(self, profile: BatchProfile) -> None:
        self.profile = profile
        self.calls: list[int] = []
        self.closed = False

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        assert self.profile.min_batch <= batch.shape[0] <= self.profile.max_batch
        self.calls.append(batch.shape[0])
        flat = batch.reshape(batch.shape[0], -1)
        return [flat.mean(1, keepdims=True), flat.max(1)]

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(("n", "calls"), [(1, [2]), (2, [2]), (5, [4, 2]), (9, [4, 4, 2])])
def test_infer_splits_and_pads_within_the_profile(n: int, calls: list[int]) -> None:
    profile = BatchProfile(min_batch=2, opt_batch=4, max_batch=4)
    runner = StubRunner(profile)
    engine = TensorRTEngine.from_runner(FAKE_CARD, runner, make_manifest(profile=profile), max_batch=8)
    assert engine.max_batch == 4  # the profile caps what the batcher may send
    c = FAKE_CARD.input_size
    batch = np.random.default_rng(0).normal(0, 1, (n, 3, c, c)).astype(np.float32)
    mean, top = engine.infer(batch)
    assert runner.calls == calls
    np.testing.assert_allclose(mean[:, 0], batch.reshape(n, -1).mean(1), rtol=1e-6)
    np.testing.assert_array_equal(top, batch.reshape(n, -1).max(1))
    assert engine.name == "tensorrt" and engine.precision == "fp16" and engine.providers == ["tensorrt"]
    engine.close()
    engine.close()  # idempotent
    assert runner.closed


def test_infer_rejects_a_wrong_chip_shape() -> None:
    profile = BatchProfile(min_batch=1, opt_batch=1, max_batch=1)
    engine = TensorRTEngine.from_runner(FAKE_CARD, StubRunner(profile), make_manifest(profile=profile), 8)
    with pytest.raises(ValueError, match=r"batch must be \[B, 3, 128, 128\]"):
        engine.infer(np.zeros((1, 3, 64, 64), np.float32))


def test_infer_staged_needs_a_device_runner() -> None:
    profile = BatchProfile(min_batch=1, opt_batch=1, max_batch=2)
    engine = TensorRTEngine.from_runner(FAKE_CARD, StubRunner(profile), make_manifest(profile=profile), 8)
    assert engine.input_device is None
    norm = Normalizer.from_card(FAKE_CARD)
    with pytest.raises(ValueError, match=r"chips must number 1\.\.2, got 3"):
        engine.infer_staged([], np.zeros((3, 3), np.int32), norm)
    with pytest.raises(RuntimeError, match="no device input buffer"):
        engine.infer_staged([], np.zeros((1, 3), np.int32), norm)


# ---- wiring ----------------------------------------------------------------------------------------------------


def test_create_engine_tensorrt_missing_file_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="engine file not found"):
        create_engine(tmp_path / "nope.engine", EngineConfig(kind="tensorrt"))


def test_create_engine_tensorrt_without_manifest(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no engine manifest"):
        create_engine(engine, EngineConfig(kind="tensorrt"))


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and CuPy are installed: the gpu-extra error path cannot be reached")
def test_create_engine_tensorrt_without_the_gpu_extra(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    write_manifest(engine, make_manifest())
    with pytest.raises(ModelLoadError, match="needs the gpu extra"):
        create_engine(engine, EngineConfig(kind="tensorrt"))


# ---- on a GPU with TensorRT: see tests/exporters/test_tensorrt.py (builds an engine, then parity) ---------------


class BlockingRunner(StubRunner):
    """``run`` waits until released, so a test can close the engine while a call is in progress."""

    def __init__(self, profile: BatchProfile) -> None:
        super().__init__(profile)
        self.started, self.release = threading.Event(), threading.Event()
        self.closed_during_run = False

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.started.set()
        assert self.release.wait(10)
        self.closed_during_run = self.closed
        return super().run(batch)


def test_close_waits_for_the_call_in_progress() -> None:
    """close() frees device buffers: it takes the engine's lock, so it cannot run under an inference."""
    profile = BatchProfile(min_batch=1, opt_batch=1, max_batch=2)
    runner = BlockingRunner(profile)
    engine = TensorRTEngine.from_runner(FAKE_CARD, runner, make_manifest(profile=profile), 2)
    c = FAKE_CARD.input_size
    call = threading.Thread(target=engine.infer, args=(np.zeros((1, 3, c, c), np.float32),))
    call.start()
    assert runner.started.wait(10)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive() and not runner.closed  # waiting for the call
    runner.release.set()
    call.join(10)
    closer.join(10)
    assert runner.closed and not runner.closed_during_run
    with pytest.raises(RuntimeError, match="the TensorRT engine is closed"):
        engine.infer(np.zeros((1, 3, c, c), np.float32))
