"""Vendor the JSON schemas that tests/deploy/test_k8s.py validates custom resources against.

Reads CustomResourceDefinitions (YAML, from a checkout of the project that publishes them), takes the
``openAPIV3Schema`` of the storage version, drops ``description`` fields (size; the schema is unchanged), and
writes ``tests/deploy/schemas/<group>_<plural>_<version>.json`` with a ``$comment`` naming the source
repository, path, commit and license. Usage:

    python scripts/vendor_crd_schemas.py --repo kedacore/keda --commit <sha> --license Apache-2.0 \\
        --root <checkout> config/crd/bases/keda.sh_scaledobjects.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "deploy" / "schemas"


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def vendor(crd_path: Path, source: str, repo: str, commit: str, license_: str) -> Path:
    crd = yaml.safe_load(crd_path.read_text())
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage", False))
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    name = f"{spec['group']}_{spec['names']['plural']}_{version['name']}.json"
    schema = {
        "$comment": f"openAPIV3Schema of {spec['names']['kind']} {spec['group']}/{version['name']}, descriptions "
        f"removed; from github.com/{repo} {source} at commit {commit} ({license_}). "
        "Regenerate with scripts/vendor_crd_schemas.py.",
        **schema,
    }
    out = OUT / name
    out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="owner/name of the source repository")
    parser.add_argument("--commit", required=True, help="commit the CRDs were read at")
    parser.add_argument("--license", required=True, dest="license_", help="the source's license")
    parser.add_argument("--root", type=Path, required=True, help="checkout (or export) of the repository")
    parser.add_argument("crds", nargs="+", help="CRD paths inside the repository")
    args = parser.parse_args()
    for rel in args.crds:
        print(vendor(args.root / rel, rel, args.repo, args.commit, args.license_))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
