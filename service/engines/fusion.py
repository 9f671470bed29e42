"""Graph fusion: the model's pre-processing (cast, NHWC->NCHW, channel order, mean/std) moved into its graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.modelcard import ModelCard

FUSED_INPUT = "chips_uint8_nhwc"


def fuse_preprocess(model_path: Path, card: ModelCard, input_name: str) -> bytes:
    """The model with its pre-processing moved into the graph, serialised.

    The new input ``chips_uint8_nhwc`` (``uint8 [B, C, C, 3]``, RGB) is cast, transposed to NCHW,
    channel-flipped for BGR models, and normalised with the card's mean/std, feeding the original input.
    The service then copies bytes instead of writing normalised floats (a quarter of the memory traffic),
    and the arithmetic runs in ONNX Runtime's own thread pool (benchmarks: ``snipserve bench``).
    """
    import onnx  # lazy: only needed when fusing
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    original = next(i for i in graph.input if i.name == input_name)
    c = card.input_size
    std = np.asarray(card.std, np.float32)
    mean = np.asarray(card.mean, np.float32)
    inits = [
        numpy_helper.from_array((255.0 * mean).reshape(1, 3, 1, 1), "pre_mean255"),
        numpy_helper.from_array((1.0 / (255.0 * std)).reshape(1, 3, 1, 1), "pre_inv_std255"),
    ]
    nodes = [
        helper.make_node("Cast", [FUSED_INPUT], ["pre_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_f32"], ["pre_nchw"], perm=[0, 3, 1, 2]),
    ]
    source = "pre_nchw"
    if card.channel_order == "BGR":
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "pre_bgr"))
        nodes.append(helper.make_node("Gather", ["pre_nchw", "pre_bgr"], ["pre_ordered"], axis=1))
        source = "pre_ordered"
    nodes += [
        helper.make_node("Sub", [source, "pre_mean255"], ["pre_centred"]),
        helper.make_node("Mul", ["pre_centred", "pre_inv_std255"], [input_name]),
    ]
    batch_dim = original.type.tensor_type.shape.dim[0]
    batch: str | int = batch_dim.dim_param or batch_dim.dim_value or "batch"
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info(FUSED_INPUT, TensorProto.UINT8, [batch, c, c, 3]))
    graph.initializer.extend(inits)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return bytes(model.SerializeToString())
