"""Checks generated manifests against the Kubernetes OpenAPI schemas, offline.

Core objects (Deployment, StatefulSet, Service) are checked with the strict JSON schemas that the
``kubernetes-validate`` package bundles (unknown fields refused); a LeaderWorkerSet with our
``schemas/leaderworkerset-v1.json``, written from the LeaderWorkerSet CRD's published OpenAPI
schema, whose pod templates refer to Kubernetes' own ``PodTemplateSpec``. ``kubernetes-validate`` is
an optional dependency (the ``cluster`` extra); :func:`available` says whether it is installed.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

K8S_VERSION = "1.33"
LWS_SCHEMA = "leaderworkerset-v1.json"


class ManifestError(ValueError):
    """A manifest the schemas refuse; names the object and the failing path."""


def available() -> bool:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _lws_validator() -> Any:
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    utils = kubernetes_validate.utils
    version = utils.major_minor(K8S_VERSION)
    folder = [v for v in utils.all_versions() if utils.major_minor(v) <= version][-1]
    defs = utils.schema_contents(f"kubernetes-json-schema/v{folder}-local-strict/_definitions.json", K8S_VERSION)
    schema = json.loads(resources.files("matrixinfer.cluster").joinpath("schemas", LWS_SCHEMA).read_text())
    registry = Registry().with_resources([(defs["$id"], Resource.from_contents(defs)),
                                          (schema["$id"], Resource.from_contents(schema))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_manifest(obj: dict[str, Any], version: str = K8S_VERSION) -> None:
    """Raise :class:`ManifestError` unless ``obj`` is valid for Kubernetes ``version``."""
    import jsonschema
    import kubernetes_validate

    what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") == "LeaderWorkerSet":
        err = jsonschema.exceptions.best_match(_lws_validator().iter_errors(obj))
        if err is not None:
            raise ManifestError(f"{what}: {err.message} at {'/'.join(map(str, err.absolute_path))}")
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ManifestError(f"{what}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ManifestError(f"{what}: no schema for it in Kubernetes {version} ({exc})") from None
