"""The default detector: a compact anchor-free single-stage net with a stride-4 output (TTFNet-style).

Why this shape: the smallest objects are ~6 px, i.e. 1.5 cells at stride 4; stride 8 would put several of
them in one cell. Context from strides 8/16/32 is merged back into the stride-4 map top-down (FPN-style
lateral 1x1 convs + nearest upsampling), so large objects (~64-110 chip px) still see enough receptive field.
Only Conv/BN/ReLU/Add/Resize(nearest)/Sigmoid/Exp/MaxPool are used so ONNX Runtime's CPU EP runs it fast.

Outputs (training form, :meth:`TinyDet.forward`): class logits ``float32 [B, K, C/4, C/4]`` and box
distances ``ltrb`` ``float32 [B, 4, C/4, C/4]`` in chip pixels from each cell centre
``((x + 0.5) * 4, (y + 0.5) * 4)``. :class:`ExportWrapper` turns these into the "snipserve" output format
(per-class probabilities with 3x3 peak suppression inside the graph).

Optional focus head (``NetConfig.focus_head``, AutoFocus): a 1-channel FocusPixel logit map
``float32 [B, 1, C/16, C/16]`` on the detector's own features -- the merged stride-4 map max-pooled to stride 16
(where the detector's object evidence is) concatenated with the stride-16 lateral map (context from strides
16/32) -- then two 3x3 Conv-BN-ReLU and a 1x1 conv. Stride 16 as in AutoFocus: a FocusChip of the next finer
level spans C / r >= ~100 px of this level (r = the scale ratio, 1.5-2.5 for the shipped levels), i.e. six or
more stride-16 cells, so a finer map would not change which chips get planned; and the head costs ~2 % of the
detector's MACs. It is trained after the detector, with the detector frozen (``models.focus_train``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

STRIDE = 4
_PRIOR = 0.01  # initial foreground probability (focal-loss prior, RetinaNet)


class NetConfig(BaseModel):
    """Architecture of :class:`TinyDet`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_classes: int = Field(default=3, ge=1, description="Number of object classes K.")
    widths: tuple[int, int, int, int] = Field(
        default=(32, 64, 96, 128), description="Channels at strides 4, 8, 16, 32."
    )
    head_width: int = Field(default=32, ge=8, description="Channels of the merged stride-4 map and the head.")
    blocks: tuple[int, int, int, int] = Field(
        default=(0, 1, 1, 1),
        description="Residual blocks at strides 4, 8, 16, 32 (after the stem / each downsampling conv).",
    )
    head_blocks: int = Field(default=0, ge=0, le=4, description="Residual blocks on the merged stride-4 map.")
    max_log_distance: float = Field(default=5.0, gt=0, description="Clamp on the log-distance regression output.")
    focus_head: bool = Field(
        default=False, description="Add the AutoFocus focus head (stride 16, 1 channel); off for older checkpoints."
    )


FOCUS_STRIDE = 16
FOCUS_PREFIX = "focus."  # state-dict keys of the focus head


def _cbr(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _Block(nn.Module):
    """Residual basic block (two 3x3 convs)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = _cbr(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(self.a(x)))


def _blocks(c: int, n: int) -> list[nn.Module]:
    return [_Block(c) for _ in range(n)]


class TinyDet(nn.Module):
    """Backbone (strides 4-32) + top-down merge to stride 4 + heatmap/ltrb heads."""

    def __init__(self, cfg: NetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or NetConfig()
        w4, w8, w16, w32 = cfg.widths
        h = cfg.head_width
        b4, b8, b16, b32 = cfg.blocks
        self.stem = nn.Sequential(_cbr(3, 16, 2), _cbr(16, w4, 2), _cbr(w4, w4), *_blocks(w4, b4))  # stride 4
        self.s8 = nn.Sequential(_cbr(w4, w8, 2), *_blocks(w8, b8))
        self.s16 = nn.Sequential(_cbr(w8, w16, 2), *_blocks(w16, b16))
        self.s32 = nn.Sequential(_cbr(w16, w32, 2), *_blocks(w32, b32))
        self.lat4, self.lat8 = nn.Conv2d(w4, h, 1), nn.Conv2d(w8, h, 1)
        self.lat16, self.lat32 = nn.Conv2d(w16, h, 1), nn.Conv2d(w32, h, 1)
        self.smooth8 = _cbr(h, h)
        self.head = nn.Sequential(*_cbr(h, h), *_blocks(h, cfg.head_blocks))
        self.cls = nn.Conv2d(h, cfg.num_classes, 1)
        self.reg = nn.Conv2d(h, 4, 1)
        nn.init.constant_(self.cls.bias, -torch.log(torch.tensor((1 - _PRIOR) / _PRIOR)).item())
        nn.init.normal_(self.reg.weight, std=0.01)
        nn.init.constant_(self.reg.bias, 1.0)  # exp(1) * 4 ~ 11 px: a typical small-object half size
        self.focus: FocusHead | None = FocusHead(h) if cfg.focus_head else None

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, 3, C, C]`` -> (merged stride-4 map ``[B, h, C/4, C/4]``, stride-16 ``[B, h, C/16, C/16]``)."""
        c4 = self.stem(x)
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p16 = self.lat16(c16) + F.interpolate(self.lat32(c32), scale_factor=2.0, mode="nearest")
        p8 = self.smooth8(self.lat8(c8) + F.interpolate(p16, scale_factor=2.0, mode="nearest"))
        p4 = self.head(self.lat4(c4) + F.interpolate(p8, scale_factor=2.0, mode="nearest"))
        return p4, p16

    def detect(self, p4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detector heads on the stride-4 map: (logits ``[B, K, C/4, C/4]``, ltrb ``[B, 4, C/4, C/4]`` px)."""
        logits = self.cls(p4)
        ltrb = torch.exp(torch.clamp(self.reg(p4), max=self.cfg.max_log_distance)) * STRIDE
        return logits, ltrb

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float32 ``[B, 3, C, C]`` normalised -> (logits ``[B, K, C/4, C/4]``, ltrb ``[B, 4, C/4, C/4]`` px)."""
        p4, _ = self.features(x)
        return self.detect(p4)

    def forward_focus(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`forward`, plus the focus logits ``[B, 1, C/16, C/16]`` (needs ``focus_head``)."""
        if self.focus is None:
            raise ValueError("this net has no focus head (NetConfig.focus_head is false)")
        p4, p16 = self.features(x)
        logits, ltrb = self.detect(p4)
        return logits, ltrb, self.focus(p4, p16)


class FocusHead(nn.Module):
    """FocusPixel logits at stride 16 from the stride-4 head map (max-pooled 4x4) and the stride-16 map."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(2 * h, h), _cbr(h, h))
        self.out = nn.Conv2d(h, 1, 1)
        # FocusPixels are common (a few % to half the cells of a dense scene): start at p = 0.1, not the detector's 0.01
        nn.init.constant_(self.out.bias, -torch.log(torch.tensor(9.0)).item())

    def inputs(self, p4: torch.Tensor, p16: torch.Tensor) -> torch.Tensor:
        """The head's input ``[B, 2h, C/16, C/16]`` (what the focus training stage caches per chip)."""
        return torch.cat([F.max_pool2d(p4, FOCUS_STRIDE // STRIDE), p16], dim=1)

    def head(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(inputs))

    def forward(self, p4: torch.Tensor, p16: torch.Tensor) -> torch.Tensor:
        return self.head(self.inputs(p4, p16))


def load_weights(net: TinyDet, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``net``; returns the keys ``state`` did not have. Two kinds may be missing:

    - the focus head's (a checkpoint without one loads into a net with one; the head keeps its initialisation);
    - whole residual blocks ``net`` has beyond the checkpoint's depth (``NetConfig.blocks`` / ``head_blocks``
      grown): each new block's last BatchNorm scale is zeroed, so it starts as the identity
      (``relu(x + 0) = x`` on the post-ReLU map it follows) and the deeper net computes exactly what the
      checkpoint did -- a function-preserving deepening, then fine-tuned.

    Anything else missing or unexpected raises.
    """
    result = net.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    for name, block in net.named_modules():
        if not isinstance(block, _Block):
            continue
        keys = {f"{name}.{k}" for k in block.state_dict() if not k.endswith("num_batches_tracked")}
        if keys <= missing:
            nn.init.zeros_(block.b[1].weight)
            missing -= keys
    bad_missing = sorted(k for k in missing if not k.startswith(FOCUS_PREFIX))
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint does not match the net: missing {bad_missing}, unexpected {list(result.unexpected_keys)}"
        )
    return list(result.missing_keys)


def peak_suppress(heat: torch.Tensor) -> torch.Tensor:
    """Zero every cell that is not the maximum of its 3x3 neighbourhood (per class), CenterNet-style."""
    pooled = F.max_pool2d(heat, 3, stride=1, padding=1)
    return heat * (pooled == heat).to(heat.dtype)


class ExportWrapper(nn.Module):
    """``images`` ``[B, 3, C, C]`` -> (``heatmap`` probabilities, peak-suppressed; ``ltrb`` chip px), plus
    ``focus`` probabilities ``[B, 1, C/16, C/16]`` when the net has a focus head."""

    def __init__(self, net: TinyDet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.net.focus is None:
            logits, ltrb = self.net(images)
            return peak_suppress(torch.sigmoid(logits)), ltrb
        logits, ltrb, focus = self.net.forward_focus(images)
        return peak_suppress(torch.sigmoid(logits)), ltrb, torch.sigmoid(focus)


def count_macs(net: TinyDet, chip: int) -> int:
    """Multiply-accumulates of one forward pass on a ``chip x chip`` input (convolutions only)."""
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out.numel() // out.shape[0]) * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net.eval()
        net(torch.zeros(1, 3, chip, chip))
    for h in handles:
        h.remove()
    return total
