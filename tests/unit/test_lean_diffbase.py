"""handlers.startup.LeanDiffBaseStorage builds the same essence as kopf's AnnotationsDiffBaseStorage
(without deep-copying status and managedFields first), so kopf's change detection is unchanged."""

from __future__ import annotations

import kopf

from libvirt_operator.core.api.common import GROUP
from libvirt_operator.handlers.startup import LeanDiffBaseStorage


def body(**extra: object) -> kopf.Body:
    raw = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "VirtualMachine",
           "metadata": {"name": "a", "namespace": "ns", "uid": "u", "resourceVersion": "7", "generation": 2,
                        "labels": {"app": "x"}, "finalizers": [f"{GROUP}/teardown"],
                        "annotations": {"note": "keep", "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                        f"{GROUP}/last-handled-configuration": '{"spec":{}}'},
                        "managedFields": [{"manager": "m", "fieldsV1": {"f:spec": {"f:cpu": {}}}}]},
           "spec": {"cpu": 1, "memory": "64Mi", "disks": [{"name": "root", "volume": {"size": "1Gi"}}]},
           "status": {"host": "h", "conditions": [{"type": "Ready", "status": "True"}]}, **extra}
    return kopf.Body(raw)


def test_the_essence_is_kopfs() -> None:
    stock, lean = kopf.AnnotationsDiffBaseStorage(prefix=GROUP), LeanDiffBaseStorage(prefix=GROUP)
    for b in (body(), body(data={"k": "v"}), kopf.Body({"metadata": {"name": "bare"}, "spec": {}})):
        assert lean.build(body=b) == stock.build(body=b)
        assert lean.build(body=b, extra_fields=[("status", "host")]) == \
            stock.build(body=b, extra_fields=[("status", "host")])
    essence = lean.build(body=body())
    assert essence == {"spec": {"cpu": 1, "memory": "64Mi", "disks": [{"name": "root", "volume": {"size": "1Gi"}}]},
                       "metadata": {"labels": {"app": "x"}, "annotations": {"note": "keep"}}}
    b = body()
    lean.build(body=b)["spec"]["disks"][0]["name"] = "changed"  # a copy, never the body's own
    assert b["spec"]["disks"][0]["name"] == "root"
