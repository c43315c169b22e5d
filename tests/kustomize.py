"""A renderer of the kustomize features deploy/k8s uses, so `make test` checks the overlays on a machine
without kubectl (Debian's kubernetes-client is 1.20, its kustomize too old for components). Where kubectl
with kustomize 5 is installed, tests/test_kubernetes.py checks this renderer's output against it.

Supported: `resources` (files and folders), `components`, `patches` (strategic merge, by file or inline)
and `images`, applied in kustomize's order: the resources (each folder rendered on its own), then the
components, then this kustomization's patches and images. Anything else in a kustomization is an error
here, so a new feature in deploy/ is added to this renderer, and to its check against kubectl, first.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
# the lists a strategic merge patch merges item by item, and the field that identifies an item
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


class KustomizeError(ValueError):
    pass


def render(folder: Path) -> list[dict]:
    """The objects `kubectl kustomize folder` prints, in the order they were declared."""
    return _build(Path(folder), "Kustomization")


def _build(folder: Path, kind: str, objects: list[dict] | None = None) -> list[dict]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{folder}: {', '.join(sorted(unknown))}: not supported by tests/kustomize.py")
    if spec.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{folder}: kind {spec.get('kind')}, expected {kind}")
    objects = [] if objects is None else objects
    for entry in spec.get("resources", []):
        path = folder / entry
        objects += _build(path, "Kustomization") if path.is_dir() else _load(path)
    for entry in spec.get("components", []):
        objects = _build(folder / entry, "Component", objects)
    for patch in spec.get("patches", []):
        if set(patch) - {"path", "patch"}:
            raise KustomizeError(f"{folder}: patches with {sorted(set(patch) - {'path', 'patch'})}: not supported")
        body = yaml.safe_load((folder / patch["path"]).read_text() if "path" in patch else patch["patch"])
        target = _find(objects, body["kind"], body["metadata"]["name"], folder)
        objects[objects.index(target)] = _merge(target, body)
    for image in spec.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _find(objects: list[dict], kind: str, name: str, folder: Path) -> dict:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KustomizeError(f"{folder}: a patch names {kind}/{name}, which no resource is")


def _merge(base, patch, key: str | None = None):
    """Strategic merge: maps merged key by key, the MERGE_KEYS lists item by item (new items first, as
    kustomize orders them), other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise KustomizeError(f"patch directive {[k for k in patch if k.startswith('$')]}: not supported")
        merged = copy.deepcopy(base)
        for name, value in patch.items():
            merged[name] = _merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merged, added = copy.deepcopy(base), []
        for item in patch:
            field = "port" if key == "ports" and "containerPort" not in item else MERGE_KEYS[key]  # a Service's
            match = next((i for i, old in enumerate(merged) if old.get(field) == item.get(field)), None)
            if match is None:
                added.append(copy.deepcopy(item))
            else:
                merged[match] = _merge(merged[match], item, None)
        return added + merged  # kustomize puts the new items first
    return copy.deepcopy(patch)


def _set_image(obj: dict, image: dict) -> None:
    """kustomize's images transformer on a workload's containers and init containers."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        reference = container["image"].partition("@")[0]
        slash = reference.rfind("/")
        colon = reference.rfind(":")
        name, _tag = (reference[:colon], reference[colon + 1:]) if colon > slash else (reference, "")
        if name != image["name"]:
            continue
        new_name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{new_name}@{image['digest']}"
        else:
            tag = image.get("newTag", _tag)
            container["image"] = f"{new_name}:{tag}" if tag else new_name
