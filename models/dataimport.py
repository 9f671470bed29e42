"""Import labelled aerial datasets (YOLO txt, DOTA labelTxt, COCO, Pascal VOC) into the project's COCO layout.

``snipserve data import --sources models/data/real_sources.yaml --root data/sources --out data/real``

One YAML (:class:`ImportConfig`) lists the sources: where each clone lives, its pinned commit and license,
its label format, a class map (source class -> project class, ``ignore``, ``ignore:<class>`` or ``drop``),
which files to leave out, and a *group* pattern: every image whose group key is the same (augmented
copies of one photo, frames of one video, tiles of one flight) lands in the same split, so train, val and
test never share a source image.

Output (``--out``)::

    train/ val/ test/        annotations.json (COCO, category ids 1..K = vehicle, boat, aircraft)
                             + images/<source>/<file>; each image record carries source, group, original path
    datacard.json            per source: repository, commit, license, attribution, counts, size distributions
    DATACARD.md              the same, for people
    problems.jsonl           every file or box that was skipped, and why

Ignore regions (``ignore`` in the class map) become COCO ``iscrowd: 1`` annotations: pycocotools does not
count detections on them as false positives, and training (:func:`models.synth.load_coco`) gives them no
loss. Bad input (a label without its image, an image that does not decode, a box outside the image, an
unknown class, a malformed line) is reported per file and skipped; it never stops the import.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.synth import CLASSES

Format = Literal["yolo", "dota", "coco", "voc"]
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


class SourceSpec(BaseModel):
    """One labelled dataset: where it is, what it may be used for, how to read it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Short id; the images folder of the source.")
    repository: str = Field(description="owner/name of the public repository the data comes from.")
    commit: str = Field(pattern=r"^[0-9a-f]{40}$", description="Pinned commit of that repository.")
    license: str = Field(description="License of the images and labels, as the source states it.")
    attribution: str = Field(description="Who made the data; what to credit.")
    url: str = Field(default="", description="Where the license/attribution is stated.")
    format: Format = Field(description="Label format.")
    root: str = Field(default=".", description="Folder inside the clone that holds the data.")
    images: list[str] = Field(min_length=1, description="Glob patterns of image files, relative to root.")
    labels: list[str] = Field(
        default_factory=list, description="Glob patterns of label files (yolo/dota/voc), relative to root."
    )
    annotations: str | None = Field(default=None, description="COCO json, relative to root (format coco).")
    names: list[str] = Field(default_factory=list, description="YOLO class names by index.")
    class_map: dict[str, str] = Field(description="Source class -> project class | ignore | ignore:<class> | drop.")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns (relative paths) to leave out.")
    exclude_reason: str = Field(default="", description="Why the excluded files are left out (for the data card).")
    group: str = Field(default=r"^(.*)$", description="Regex on the file stem; its first group is the group key.")
    augmented_copies: bool = Field(
        default=False, description="Groups hold augmented copies of one photo: val/test keep one copy per group."
    )
    fixed_splits: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Groups placed in a split by name (e.g. one KIT sequence and one drone video in val), "
        "decided before any evaluation; the other groups are assigned by the shuffled fill.",
    )
    unlabelled: Literal["skip", "background"] = Field(
        default="skip", description="Images without a label file: reported and skipped, or kept as empty images."
    )

    @field_validator("class_map")
    @classmethod
    def _targets(cls, v: dict[str, str]) -> dict[str, str]:
        allowed = {*CLASSES, "drop", "ignore", *(f"ignore:{c}" for c in CLASSES)}
        bad = {k: t for k, t in v.items() if t not in allowed}
        if bad:
            raise ValueError(f"class_map targets must be one of {sorted(allowed)}; got {bad}")
        return v


class ImportConfig(BaseModel):
    """The sources file (``models/data/real_sources.yaml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[SourceSpec] = Field(min_length=1)
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15},
        description="Target fraction of each source's images per split (assigned by whole groups).",
    )
    seed: int = Field(default=0, description="Seed of the group shuffle.")

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(SPLITS) or any(f < 0 for f in v.values()) or not math.isclose(sum(v.values()), 1.0):
            raise ValueError(f"splits must give {SPLITS} fractions summing to 1, got {v}")
        return v

    @classmethod
    def from_yaml(cls, path: Path) -> ImportConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


@dataclass
class Box:
    """One label: ``xyxy`` in image pixels, the source class name."""

    xyxy: tuple[float, float, float, float]
    cls: str


@dataclass
class Record:
    """One imported image: where it came from and its kept boxes (project class or ignore)."""

    path: Path
    rel: str
    group: str
    width: int
    height: int
    boxes: list[tuple[tuple[float, float, float, float], str, bool]]  # xyxy, project class, is_ignore


@dataclass
class Report:
    """Problems found while importing, one entry per file (or per box) that was skipped."""

    problems: list[dict[str, str]] = field(default_factory=list)

    def add(self, source: str, file: str, kind: str, detail: str) -> None:
        self.problems.append({"source": source, "file": file, "kind": kind, "detail": detail})

    def counts(self, source: str) -> dict[str, int]:
        return dict(Counter(p["kind"] for p in self.problems if p["source"] == source))


class LabelError(ValueError):
    """A label file that cannot be read at all."""


# ----------------------------------------------------------------------------------------------- readers


def read_yolo(text: str, width: int, height: int, names: list[str]) -> tuple[list[Box], list[str]]:
    """``cls cx cy w h`` (normalised) lines -> boxes in pixels; also the lines that could not be parsed."""
    boxes, bad = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            k = int(parts[0])
            cx, cy, bw, bh = (float(p) for p in parts[1:5])
            if len(parts) < 5 or not all(math.isfinite(v) for v in (cx, cy, bw, bh)):
                raise ValueError
        except ValueError:
            bad.append(line.strip()[:80])
            continue
        name = names[k] if 0 <= k < len(names) else f"#{k}"
        x1, y1 = (cx - bw / 2) * width, (cy - bh / 2) * height
        boxes.append(Box((x1, y1, x1 + bw * width, y1 + bh * height), name))
    return boxes, bad


def read_dota(text: str) -> tuple[list[Box], list[str]]:
    """DOTA labelTxt ``x1 y1 ... x4 y4 class difficult`` (oriented) -> the enclosing axis-aligned boxes."""
    boxes, bad = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith(("imagesource", "gsd")):
            continue
        try:
            xy = np.array([float(p) for p in parts[:8]], np.float64).reshape(4, 2)
            if len(parts) < 9 or not np.isfinite(xy).all():
                raise ValueError
        except ValueError:
            bad.append(line.strip()[:80])
            continue
        x1, y1 = xy.min(axis=0)
        x2, y2 = xy.max(axis=0)
        boxes.append(Box((float(x1), float(y1), float(x2), float(y2)), parts[8]))
    return boxes, bad


def read_voc(text: str) -> tuple[list[Box], list[str], str | None]:
    """Pascal VOC XML -> boxes (VOC's 1-based inclusive pixels -> continuous), bad objects, ``filename``."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise LabelError(f"not valid XML: {e}") from None
    boxes, bad = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        try:
            if bb is None or not name:
                raise ValueError
            x1, y1, x2, y2 = (float(bb.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise ValueError
        except ValueError:
            bad.append(name or "<object without name>")
            continue
        boxes.append(Box((x1 - 1.0, y1 - 1.0, x2, y2), name))
    return boxes, bad, root.findtext("filename")


# ----------------------------------------------------------------------------------------------- import


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)


def _glob(root: Path, patterns: list[str], exclude: list[str]) -> list[Path]:
    found = {p for pat in patterns for p in root.glob(pat) if p.is_file()}
    return sorted(p for p in found if not _matches(p.relative_to(root).as_posix(), exclude))


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height of an image that decodes completely (raises ``OSError`` otherwise)."""
    with Image.open(path) as im:
        im.load()
        return im.size


def _checked_size(spec: SourceSpec, rel: str, path: Path, report: Report) -> tuple[int, int] | None:
    """The image's size, or ``None`` after reporting it as corrupt."""
    try:
        return _image_size(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        report.add(spec.name, rel, "corrupt image", f"{type(e).__name__}: {str(e)[:120]}")
        return None


def _label_key(path: Path) -> str:
    """Images and labels pair by file stem (``a/images/x.jpg`` <-> ``a/labels/x.txt``)."""
    return path.stem


def _keep_box(
    spec: SourceSpec, rel: str, box: Box, size: tuple[int, int], report: Report
) -> tuple[tuple[float, float, float, float], str, bool] | None:
    """Map a source box to (clipped xyxy, project class, is_ignore), or report why it is skipped."""
    target = spec.class_map.get(box.cls)
    if target is None:
        report.add(spec.name, rel, "unknown class", f"class {box.cls!r} is not in the class map")
        return None
    if target == "drop":
        return None
    w, h = size
    x1, y1, x2, y2 = box.xyxy
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    if cx2 - cx1 < 1.0 or cy2 - cy1 < 1.0:
        kind = "box outside image" if (x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h) else "degenerate box"
        report.add(spec.name, rel, kind, f"{box.cls} [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}] in a {w}x{h} image")
        return None
    if target.startswith("ignore"):
        return (cx1, cy1, cx2, cy2), target.partition(":")[2], True
    return (cx1, cy1, cx2, cy2), target, False


def _group_key(spec: SourceSpec, path: Path) -> str:
    m = re.search(spec.group, path.stem)
    return (m.group(1) if m and m.groups() else m.group(0) if m else path.stem) or path.stem


def _read_labels(spec: SourceSpec, label: Path, size: tuple[int, int]) -> tuple[list[Box], list[str]]:
    text = label.read_text(errors="replace")
    if spec.format == "yolo":
        return read_yolo(text, size[0], size[1], spec.names)
    if spec.format == "dota":
        return read_dota(text)
    boxes, bad, _ = read_voc(text)
    return boxes, bad


def import_files(spec: SourceSpec, root: Path, report: Report) -> list[Record]:
    """Read one yolo/dota/voc source: pair images with label files, validate, map classes."""
    images = _glob(root, spec.images, spec.exclude)
    labels = {_label_key(p): p for p in _glob(root, spec.labels, spec.exclude)}
    image_keys = {_label_key(p) for p in images}
    for key, lab in sorted(labels.items()):
        if key not in image_keys:
            report.add(spec.name, lab.relative_to(root).as_posix(), "label without image", "no image with this stem")
    records = []
    for path in images:
        rel = path.relative_to(root).as_posix()
        size = _checked_size(spec, rel, path, report)
        if size is None:
            continue
        label = labels.get(_label_key(path))
        if label is None:
            if spec.unlabelled == "skip":
                report.add(spec.name, rel, "image without label", "no label file; skipped (unlabelled)")
                continue
            boxes: list[Box] = []
        else:
            try:
                boxes, bad = _read_labels(spec, label, size)
            except LabelError as e:
                report.add(spec.name, label.relative_to(root).as_posix(), "corrupt label", str(e))
                continue
            for line in bad:
                report.add(spec.name, label.relative_to(root).as_posix(), "malformed label line", line)
        kept = [k for b in boxes if (k := _keep_box(spec, rel, b, size, report)) is not None]
        records.append(Record(path, rel, _group_key(spec, path), size[0], size[1], kept))
    return records


def import_coco(spec: SourceSpec, root: Path, report: Report) -> list[Record]:
    """Read one COCO source (``annotations`` json + images relative to its folder)."""
    if spec.annotations is None:
        raise ValueError(f"source {spec.name}: format coco needs 'annotations'")
    ann_path = root / spec.annotations
    try:
        coco = json.loads(ann_path.read_text())
        cats = {c["id"]: c["name"] for c in coco["categories"]}
        per: dict[Any, list[Box]] = defaultdict(list)
        for a in coco["annotations"]:
            x, y, w, h = (float(v) for v in a["bbox"])
            per[a["image_id"]].append(Box((x, y, x + w, y + h), cats.get(a["category_id"], f"#{a['category_id']}")))
        entries = [(im["id"], im["file_name"]) for im in coco["images"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.add(spec.name, spec.annotations, "corrupt label", f"{type(e).__name__}: {str(e)[:120]}")
        return []
    records = []
    for image_id, file_name in entries:
        path = ann_path.parent / file_name
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else file_name
        if _matches(rel, spec.exclude):
            continue
        if not path.is_file():
            report.add(spec.name, rel, "label without image", "annotations name an image that is not there")
            continue
        size = _checked_size(spec, rel, path, report)
        if size is None:
            continue
        kept = [k for b in per.get(image_id, []) if (k := _keep_box(spec, rel, b, size, report)) is not None]
        records.append(Record(path, rel, _group_key(spec, path), size[0], size[1], kept))
    return records


def import_source(spec: SourceSpec, clone: Path, report: Report) -> list[Record]:
    """All records of one source whose clone is at ``clone``."""
    root = clone / spec.root
    if not root.is_dir():
        report.add(spec.name, str(root), "missing source", "folder not found: run scripts/fetch-real-data.sh")
        return []
    return import_coco(spec, root, report) if spec.format == "coco" else import_files(spec, root, report)


def assign_splits(
    records: list[Record], fractions: dict[str, float], seed: int, fixed: dict[str, list[str]] | None = None
) -> dict[str, str]:
    """Group key -> split. ``fixed`` groups first; then whole groups, shuffled by ``seed``, each to the split
    furthest below its share of the source's images."""
    sizes = Counter(r.group for r in records)
    out = {g: split for split, gs in (fixed or {}).items() for g in gs if g in sizes}
    have = dict.fromkeys(SPLITS, 0)
    for g, split in out.items():
        have[split] += sizes[g]
    groups = sorted(g for g in sizes if g not in out)
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    total = sum(sizes.values())
    for g in groups:
        split = max(SPLITS, key=lambda s: (fractions[s] * total - have[s], -SPLITS.index(s)))
        out[g] = split
        have[split] += sizes[g]
    return out


def _dedupe(records: list[Record]) -> list[Record]:
    """One record per group (the first by path): augmented copies count once in val/test."""
    seen: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.rel):
        seen.setdefault(r.group, r)
    return list(seen.values())


def _size_stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    q = np.percentile(a, [5, 25, 50, 75, 95])
    return {
        "count": int(a.size),
        "p5": round(float(q[0]), 1),
        "p25": round(float(q[1]), 1),
        "median": round(float(q[2]), 1),
        "p75": round(float(q[3]), 1),
        "p95": round(float(q[4]), 1),
        "coco_small": int((a < 32).sum()),
        "coco_medium": int(((a >= 32) & (a < 96)).sum()),
        "coco_large": int((a >= 96).sum()),
    }


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def write_split(split: str, rows: list[tuple[SourceSpec, Record]], out: Path) -> dict[str, Any]:
    """Write ``out/<split>`` (images + annotations.json); returns its COCO dict."""
    cat_id = {c: i + 1 for i, c in enumerate(CLASSES)}
    images, anns = [], []
    for spec, r in rows:
        file_name = f"images/{spec.name}/{r.rel.replace('/', '__')}"
        _copy(r.path, out / split / file_name)
        image_id = len(images) + 1
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": r.width,
                "height": r.height,
                "source": spec.name,
                "group": r.group,
                "original": f"{spec.repository}@{spec.commit[:12]}:{spec.root}/{r.rel}",
            }
        )
        for (x1, y1, x2, y2), cls, ignore in r.boxes:
            for c in [cls] if cls else list(CLASSES):
                w, h = x2 - x1, y2 - y1
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": cat_id[c],
                        "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)],
                        "area": round(w * h, 2),
                        "iscrowd": int(ignore),
                    }
                )
    coco = {
        "info": {"description": f"snipserve real aerial import, split {split}"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_id[c], "name": c} for c in CLASSES],
    }
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / split / "annotations.json").write_text(json.dumps(coco))
    return coco


def source_card(spec: SourceSpec, by_split: dict[str, list[Record]], report: Report) -> dict[str, Any]:
    """The data card entry of one source."""
    per_split: dict[str, Any] = {}
    for split, recs in by_split.items():
        boxes = [b for r in recs for b in r.boxes if not b[2]]
        per_split[split] = {
            "images": len(recs),
            "groups": len({r.group for r in recs}),
            "boxes": dict(Counter(c for _, c, _ in boxes)),
            "ignore_regions": sum(b[2] for r in recs for b in r.boxes),
        }
    all_recs = [r for recs in by_split.values() for r in recs]
    sizes = [math.sqrt((x2 - x1) * (y2 - y1)) for r in all_recs for (x1, y1, x2, y2), _, ig in r.boxes if not ig]
    return {
        "name": spec.name,
        "repository": spec.repository,
        "commit": spec.commit,
        "license": spec.license,
        "attribution": spec.attribution,
        "url": spec.url,
        "format": spec.format,
        "class_map": spec.class_map,
        "excluded": {"patterns": spec.exclude, "reason": spec.exclude_reason},
        "splits": per_split,
        "object_size_sqrt_area_px": _size_stats(sizes),
        "image_width_px": _size_stats([float(r.width) for r in all_recs]),
        "image_height_px": _size_stats([float(r.height) for r in all_recs]),
        "problems": report.counts(spec.name),
    }


def markdown_card(card: dict[str, Any]) -> str:
    """DATACARD.md from the JSON card."""
    lines = [
        "# Data card: real aerial images",
        "",
        "Imported by `snipserve data import`; splits are by group (source photo, video or flight), so no",
        "source image is shared between train, val and test. Datasets are not committed; "
        "`scripts/fetch-real-data.sh` fetches the pinned commits.",
        "",
        "| source | repository @ commit | license | train / val / test images | boxes (train+val+test) |",
        "|---|---|---|---|---|",
    ]
    for s in card["sources"]:
        sp = s["splits"]
        boxes: Counter[str] = Counter()
        for v in sp.values():
            boxes.update(v["boxes"])
        counts = " / ".join(str(sp[k]["images"]) for k in SPLITS)
        box_str = ", ".join(f"{k} {v}" for k, v in sorted(boxes.items()))
        lines.append(
            f"| {s['name']} | `{s['repository']}` @ `{s['commit'][:12]}` | {s['license']} | {counts} | {box_str} |"
        )
    for s in card["sources"]:
        z = s["object_size_sqrt_area_px"]
        lines += [
            "",
            f"## {s['name']}",
            "",
            f"- Repository: `{s['repository']}`, commit `{s['commit']}`; format `{s['format']}`.",
            f"- License: {s['license']}. Attribution: {s['attribution']} {s['url']}".rstrip(),
            f"- Class map: {', '.join(f'{k} → {v}' for k, v in s['class_map'].items())}.",
        ]
        if s["excluded"]["patterns"]:
            lines.append(f"- Left out: `{'`, `'.join(s['excluded']['patterns'])}` — {s['excluded']['reason']}")
        if z.get("count"):
            lines.append(
                f"- Object size (sqrt(area), px): p5 {z['p5']}, median {z['median']}, p95 {z['p95']}; "
                f"COCO small/medium/large {z['coco_small']}/{z['coco_medium']}/{z['coco_large']}."
            )
        w, h = s["image_width_px"], s["image_height_px"]
        if w.get("count"):
            lines.append(f"- Image size: width p5–p95 {w['p5']}–{w['p95']} px, height {h['p5']}–{h['p95']} px.")
        for split in SPLITS:
            v = s["splits"][split]
            lines.append(
                f"- {split}: {v['images']} images in {v['groups']} groups, boxes {v['boxes']}, "
                f"ignore regions {v['ignore_regions']}."
            )
        if s["problems"]:
            lines.append(f"- Skipped and reported (`problems.jsonl`): {s['problems']}.")
    return "\n".join(lines) + "\n"


def run_import(cfg: ImportConfig, root: Path, out: Path) -> dict[str, Any]:
    """Import every source under ``root/<name>`` into ``out``; returns the data card."""
    report = Report()
    if out.exists():
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[SourceSpec, Record]]] = {s: [] for s in SPLITS}
    cards = []
    for spec in cfg.sources:
        records = import_source(spec, root / spec.name, report)
        split_of = assign_splits(records, cfg.splits, cfg.seed, spec.fixed_splits)
        by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
        for r in records:
            by_split[split_of[r.group]].append(r)
        if spec.augmented_copies:
            by_split["val"], by_split["test"] = _dedupe(by_split["val"]), _dedupe(by_split["test"])
        for split in SPLITS:
            rows[split] += [(spec, r) for r in by_split[split]]
        cards.append(source_card(spec, by_split, report))
    for split in SPLITS:
        write_split(split, rows[split], out)
    card = {"classes": list(CLASSES), "splits": cfg.splits, "seed": cfg.seed, "sources": cards}
    (out / "datacard.json").write_text(json.dumps(card, indent=2))
    (out / "DATACARD.md").write_text(markdown_card(card))
    with (out / "problems.jsonl").open("w") as f:
        for p in report.problems:
            f.write(json.dumps(p) + "\n")
    return card | {"problems": len(report.problems)}
