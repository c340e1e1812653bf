"""Putting the CRDs and sample objects into a (local) API server, with the synchronous `kubernetes`
client the dev tools and tests share."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException


def apply_crds(api: client.ApiClient, documents: Iterable[dict[str, Any]], *, timeout: float = 30) -> list[str]:
    """Create or replace each CRD, then wait until all are Established. Returns their names."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    for doc in documents:
        name = doc["metadata"]["name"]
        try:
            current = ext.read_custom_resource_definition(name)
            doc = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current.metadata.resource_version}}
            ext.replace_custom_resource_definition(name, doc)
        except ApiException as err:
            if err.status != 404:
                raise
            ext.create_custom_resource_definition(doc)
        names.append(name)
    deadline = time.monotonic() + timeout
    waiting = list(names)
    while waiting:
        waiting = [n for n in waiting if not _established(ext.read_custom_resource_definition(n))]
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"CRDs not Established after {timeout}s: {', '.join(waiting)}")
        if waiting:
            time.sleep(0.2)
    return names


def create_objects(api: client.ApiClient, documents: Iterable[dict[str, Any]]) -> list[str]:
    """Create custom objects (an object that exists already, e.g. from an earlier run, is left as
    it is). Returns ``Kind/name`` of each."""
    custom = client.CustomObjectsApi(api)
    created = []
    for doc in documents:
        group, version = doc["apiVersion"].split("/")
        plural = doc["kind"].lower() + "s"
        namespace = doc["metadata"].get("namespace")
        try:
            if namespace:
                custom.create_namespaced_custom_object(group, version, namespace, plural, doc)
            else:
                custom.create_cluster_custom_object(group, version, plural, doc)
        except ApiException as err:
            if err.status != 409:
                raise
        created.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return created


def _established(crd: Any) -> bool:
    return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))
