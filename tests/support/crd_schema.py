"""Validate KubeRay manifests the way the API server's strict field validation does.

A CRD's openAPIV3Schema is close to JSON Schema, but Kubernetes reads it with rules of its own:
an object that lists `properties` rejects any other field (strict mode, `kubectl apply
--validate=strict`, the default since 1.27) unless it carries
`x-kubernetes-preserve-unknown-fields`, and `x-kubernetes-int-or-string` accepts both types.
`to_json_schema` rewrites a CRD schema with those rules spelled out for the `jsonschema`
package. Not covered: CEL rules (`x-kubernetes-validations`) and list-map key uniqueness.
"""
from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

import yaml

CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "kuberay-crd"
CRD_FILES = {"RayCluster": "rayclusters-{v}.yaml.gz", "RayJob": "rayjobs-{v}.yaml.gz"}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]i?|m)?$")
_UNITS = {None: 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def crd_versions() -> list[str]:
    """KubeRay releases whose CRDs are present, e.g. ["v1.6.0", "v1.7.0"]."""
    found = {m.group(1) for p in CRD_DIR.glob("rayjobs-v*.yaml.gz")
             if (m := re.match(r"rayjobs-(v[\d.]+)\.yaml\.gz$", p.name))}
    return sorted(found, key=lambda v: tuple(int(x) for x in v[1:].split(".")))


@functools.cache
def load_schema(kind: str, version: str) -> dict:
    """The strict JSON Schema of `kind` (RayCluster or RayJob), API version ray.io/v1."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 8x faster on 2 MB
    with gzip.open(CRD_DIR / CRD_FILES[kind].format(v=version), "rt") as f:
        crd = yaml.load(f, Loader=loader)
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return to_json_schema(v1["schema"]["openAPIV3Schema"], root=True)


def to_json_schema(node: dict, root: bool = False) -> dict:
    out = dict(node)
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in node:
        out["properties"] = {name: to_json_schema(sub) for name, sub in node["properties"].items()}
        if root:  # apiVersion/kind/metadata: ObjectMeta is validated by the API server itself
            out["properties"]["metadata"] = {"type": "object"}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = to_json_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("type") == "object" and not preserve and "additionalProperties" not in node:
        # Listed properties or none at all: any other field is unknown (pruned, or an error).
        out["additionalProperties"] = False
    return out


def errors(manifest: dict, schema: dict) -> list[str]:
    """Every schema violation of `manifest`, as 'path: message' lines (empty when valid)."""
    from jsonschema import Draft7Validator

    validator = Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.path)))]


def quantity(value) -> float:
    """A Kubernetes resource quantity ("16Gi", "500m", 8) as a number of base units."""
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]
