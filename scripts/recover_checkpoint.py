"""Rebuild a trainable ``model.pt`` from a shipped snipserve ONNX model (BatchNorm folded into its convs).

The synthetic-pretraining stage of the default detector was shipped as ONNX only. To fine-tune it (the
sim-to-real stage, ``models/configs/real.yaml``) this script maps the ONNX convolutions back onto
:class:`models.net.TinyDet` and un-folds every BatchNorm so that the network computes the same function in
eval mode *and* keeps sensible statistics in train mode: each BN gets ``running_mean = mu``,
``running_var = sigma**2``, ``weight = sigma`` and ``bias = mu + b``, where ``mu, sigma`` are the per-channel
statistics of the folded conv's output (without bias) over calibration chips and ``b`` is the folded bias.
Eval mode then computes ``(z - mu) / sigma * sigma + mu + b = z + b``: exactly the ONNX conv.

    python scripts/recover_checkpoint.py --onnx models/snipserve_default.onnx --data data/synth_train \
        --out runs/synthetic/model.pt

The result is checked against ONNX Runtime on calibration chips (printed; fails above 0.04 px max |diff| on ltrb
or 1e-4 median |diff| on the heatmap).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from models.net import NetConfig, TinyDet


def _conv_order(net: TinyDet) -> list[nn.Conv2d]:
    """TinyDet's BN-followed convolutions in the order the ONNX trace emits them (unnamed in the graph)."""
    convs: list[nn.Conv2d] = []
    for part in (net.stem, net.s8, net.s16, net.s32, net.smooth8, net.head):
        convs += [m for m in part.modules() if isinstance(m, nn.Conv2d)]
    return convs


def _bn_of(net: TinyDet) -> dict[int, nn.BatchNorm2d]:
    """Map id(conv) -> the BatchNorm2d that follows it inside its Sequential."""
    out: dict[int, nn.BatchNorm2d] = {}
    for seq in net.modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq)
            for a, b in zip(mods, mods[1:], strict=False):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    out[id(a)] = b
    return out


def recover(onnx_path: Path, calib: np.ndarray) -> tuple[TinyDet, dict[str, object]]:
    """``calib``: float32 ``[N, 3, C, C]`` normalised chips. Returns the net (eval mode) and the card."""
    model = onnx.load(str(onnx_path))
    card = json.loads({p.key: p.value for p in model.metadata_props}["snipserve.card"])
    net_cfg = NetConfig.model_validate(card["training"]["config"]["net"])
    net = TinyDet(net_cfg)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    folded: list[tuple[np.ndarray, np.ndarray]] = []
    named = {f"net.{n}" for n in ("lat4", "lat8", "lat16", "lat32", "cls", "reg")}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w_name, b_name = node.input[1], node.input[2]
        if w_name.rsplit(".", 1)[0] in named:
            continue
        folded.append((inits[w_name], inits[b_name]))
    convs = _conv_order(net)
    if len(convs) != len(folded):
        raise SystemExit(f"ONNX has {len(folded)} folded convs, TinyDet {len(convs)}")
    sd = net.state_dict()
    for name in named:
        for kind in ("weight", "bias"):
            sd[f"{name[4:]}.{kind}"] = torch.from_numpy(inits[f"{name}.{kind}"].copy())
    net.load_state_dict(sd)
    bns = _bn_of(net)
    with torch.no_grad():
        for conv, (w, b) in zip(convs, folded, strict=True):
            if tuple(conv.weight.shape) != w.shape:
                raise SystemExit(f"shape mismatch {tuple(conv.weight.shape)} vs {w.shape}")
            conv.weight.copy_(torch.from_numpy(w))
            bn = bns[id(conv)]
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
    # calibrate: per-channel stats of each conv's output, in forward order, then un-fold the BN
    net.eval()
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(m: nn.Module, _i: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        stats[id(m)] = (out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3)).clamp(min=1e-3))

    with torch.no_grad():
        for conv in convs:  # one at a time: earlier BNs must already be final when a later conv is measured
            h = conv.register_forward_hook(hook)
            net(torch.from_numpy(calib))
            h.remove()
            mu, sigma = stats[id(conv)]
            bn = bns[id(conv)]
            b = bn.bias.clone()
            bn.running_mean.copy_(mu)
            bn.running_var.copy_(sigma**2 - bn.eps)
            bn.weight.copy_(sigma)
            bn.bias.copy_(mu + b)
    return net, card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, default=Path("models/snipserve_default.onnx"))
    ap.add_argument("--data", type=Path, required=True, help="COCO folder with images for calibration chips")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chips", type=int, default=96)
    args = ap.parse_args()
    from models.synth import CLASSES, load_coco
    from models.train import MEAN, STD, normalise

    _, items = load_coco(args.data)
    rng = np.random.default_rng(0)
    chips = []
    import cv2

    for path, _, _ in items[: max(1, args.chips // 8)]:
        img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        for _ in range(8):
            y = int(rng.integers(0, max(1, img.shape[0] - 256)))
            x = int(rng.integers(0, max(1, img.shape[1] - 256)))
            chip = np.zeros((256, 256, 3), np.uint8)
            crop = img[y : y + 256, x : x + 256]
            chip[: crop.shape[0], : crop.shape[1]] = crop
            chips.append(chip)
    calib = normalise(np.stack(chips)).numpy()
    net, card = recover(args.onnx, calib)
    sess = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    from models.net import ExportWrapper

    with torch.no_grad():
        heat_t, ltrb_t = ExportWrapper(net)(torch.from_numpy(calib[:16]))
    heat_o, ltrb_o = sess.run(None, {"images": calib[:16]})
    d_ltrb = float(np.abs(ltrb_t.numpy() - ltrb_o).max())
    d_heat = float(np.median(np.abs(heat_t.numpy() - heat_o)))
    print(f"parity vs ONNX Runtime: ltrb max |diff| {d_ltrb:.2e}, heatmap median |diff| {d_heat:.2e}")
    if d_ltrb > 0.04 or d_heat > 1e-4:
        raise SystemExit("recovered network does not match the ONNX model")
    tr = card["training"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": net.state_dict(),
            "net": net.cfg.model_dump(),
            "sampler": tr["config"]["sampler"],
            "classes": list(CLASSES[: net.cfg.num_classes]),
            "mean": MEAN,
            "std": STD,
            "training": {
                k: tr[k] for k in ("config", "seed", "steps", "images", "train_seconds", "hardware") if k in tr
            }
            | {"recovered_from": str(args.onnx)},
        },
        args.out,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
