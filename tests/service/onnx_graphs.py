"""Tiny ONNX graphs for adapter/engine tests: constant detections broadcast over the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def constant_model(
    path: Path, outputs: dict[str, np.ndarray], chip: int, metadata: dict[str, str], batch: str | int = "B"
) -> Path:
    """A model with input ``images [batch, 3, chip, chip]`` whose outputs are ``outputs`` (each ``[1, ...]``)
    broadcast to the batch: ``out = const + 0 * sum(images)`` (so ONNX Runtime really computes it). ``batch``: a
    name for a dynamic batch dimension, or an int for a static one (``yolo export``'s default is 1)."""
    nodes = [
        helper.make_node("ReduceSum", ["images", "axes"], ["s"], keepdims=1),  # [B, 1, 1, 1]
        helper.make_node("Mul", ["s", "zero"], ["z4"]),
    ]
    inits = [
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
    ]
    graph_outputs = []
    for name, value in outputs.items():
        rank = value.ndim
        # reshape the [B,1,1,1] zero to [B, 1, ..., 1] of the output's rank, then add the constant
        shape_name = f"{name}_shape"
        inits.append(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), shape_name))
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_const"))
        nodes.append(helper.make_node("Reshape", ["z4", shape_name], [f"{name}_z"]))
        nodes.append(helper.make_node("Add", [f"{name}_z", f"{name}_const"], [name]))
        dims: list[str | int] = [batch, *value.shape[1:]]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    graph = helper.make_graph(
        nodes,
        "const",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, chip, chip])],
        graph_outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
