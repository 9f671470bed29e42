"""A tiny random-weight detector in the ``snipserve`` output format, with a card, for engine parity checks.

``images [B, 3, C, C]`` -> two stride-2 3x3 convolutions with ReLU -> ``heatmap [B, K, C/4, C/4]`` (sigmoid)
and ``ltrb [B, 4, C/4, C/4]`` (ReLU, chip pixels). Real arithmetic (so TensorRT cannot fold it away), fixed
seed, no training: it is for comparing runtimes, not for detecting anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.engines.fake import FAKE_CARD
from service.modelcard import CARD_METADATA_KEY, ModelCard


def tiny_card(chip: int = 128) -> ModelCard:
    return FAKE_CARD.model_copy(
        update={
            "name": "tiny-random",
            "input_size": chip,
            "output_format": "snipserve",
            "input_name": "images",
            "output_names": ("heatmap", "ltrb"),
        }
    )


def tiny_detector_onnx(path: Path, chip: int = 128, seed: int = 0) -> Path:
    """Write the model to ``path`` (dynamic batch, opset 17, card in the metadata); returns ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    card = tiny_card(chip)
    k = len(card.classes)

    def w(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [
        w("w1", (16, 3, 3, 3), 0.3),
        w("b1", (16,), 0.1),
        w("w2", (16, 16, 3, 3), 0.1),
        w("b2", (16,), 0.1),
        w("wh", (k, 16, 1, 1), 0.3),
        numpy_helper.from_array(np.full(k, -3.0, np.float32), "bh"),  # sparse peaks: a few cells above 0.3
        w("wl", (4, 16, 1, 1), 0.3),
        w("bl", (4,), 0.5),
        numpy_helper.from_array(np.array(16.0, np.float32), "ltrb_scale"),
    ]
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wh", "bh"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["heatmap"]),
        helper.make_node("Conv", ["r2", "wl", "bl"], ["l"]),
        helper.make_node("Relu", ["l"], ["lr"]),
        helper.make_node("Mul", ["lr", "ltrb_scale"], ["ltrb"]),
    ]
    q = chip // 4
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, chip, chip])],
        [
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", k, q, q]),
            helper.make_tensor_value_info("ltrb", TensorProto.FLOAT, ["batch", 4, q, q]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime / TensorRT parser we support
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_METADATA_KEY, json.dumps(card.model_dump(mode="json", exclude_none=True))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
