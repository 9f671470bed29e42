"""snipserve runtime: decode -> plan -> crop -> batch -> engine -> adapters -> postprocess -> soft-NMS -> API."""

from service.soft_nms import batched_soft_nms, soft_nms

__all__ = ["soft_nms", "batched_soft_nms"]
