"""The deployment manifests on a real kube-apiserver: they apply, the pod passes the `restricted`
Pod Security profile, and the operator's RBAC is both sufficient and least-privilege.

The RBAC checks run as the operator's own ServiceAccount (a TokenRequest token in a kubeconfig of
its own), with SelfSubjectAccessReview (`kubectl auth can-i`) and real requests. A second operator is
not started: the session operator may already be serving this apiserver and the two would fight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from tests.harness.kube import REPO

DEPLOY = REPO / "manifests" / "deploy"
CHART = REPO / "charts" / "libvirt-operator"
NAMESPACE = "libvirt-operator"
SERVICE_ACCOUNT = "libvirt-operator"
GROUP = "virt.libvirt-operator.io"
KINDS = ("libvirthosts", "virtualmachines", "isoimages", "virtualmachinesnapshots", "virtualmachinerestores",
         "virtualmachinemigrations")
FIELD_MANAGER = "test-deploy-manifests"

# Everything the operator does on the API, derived from the code. (verb, group, resource, subresource)
REQUIRED: list[tuple[str, str, str, str]] = [
    # kopf watches each kind it has handlers for (handlers/host.py, vm.py, iso.py, snapshot.py, restore.py): list,
    # then watch. KubeClient.list_objects (adapters/kube/client.py) lists libvirthosts (reconcile/iso_targets.py,
    # handlers/vm_state.py _load_hosts) and virtualmachines (reconcile/iso_delete.py: is the ISO in use?).
    *[(verb, GROUP, kind, "") for kind in KINDS for verb in ("list", "watch")],
    # kopf PATCHes the main resource for its finalizer (settings.persistence.finalizer,
    # handlers/startup.py) and its progress + diff-base annotations (kopf/_cogs/clients/patching.py).
    *[("patch", GROUP, kind, "") for kind in KINDS],
    # Status: kopf's patch.status (handlers/host.py probe_host) and KubeClient.patch_status
    # (handlers/vm_apply.py _apply, handlers/iso.py, reconcile/iso_status.py): merge patches on /status.
    *[("patch", GROUP, kind, "status") for kind in KINDS],
    # KubeClient.read_secret: host credentials (reconcile/host.py) and download credentials
    # (reconcile/iso.py), by name, in any namespace (LibvirtHost is cluster-scoped).
    ("get", "", "secrets", ""),
    # kopf.event() (handlers/*.py) and kopf's own handler events: POST core/v1 events.
    ("create", "", "events", ""),
    # kopf's resource observer (kopf/_core/reactor/observation.py): CRDs added/changed at runtime.
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    # Namespace labels for LibvirtHost namespaceSelector: handlers/namespaces.py watches namespaces
    # (kopf: list, then watch); KubeClient.namespace_labels lists one by field selector on a cache miss.
    ("list", "", "namespaces", ""),
    ("watch", "", "namespaces", ""),
]

# What the operator must NOT be able to do.
FORBIDDEN: list[tuple[str, str, str, str]] = [
    # The operator never writes spec and never creates or deletes user objects (patch is the only
    # write: kopf needs it for finalizers/annotations; RBAC cannot restrict the fields of a patch).
    *[(verb, GROUP, kind, "") for kind in KINDS for verb in ("update", "create", "delete", "deletecollection")],
    *[("update", GROUP, kind, "status") for kind in KINDS],
    # Nor does it GET single objects: everything comes from watches and lists.
    *[("get", GROUP, kind, "") for kind in KINDS],
    # Secrets: read by name only.
    *[(verb, "", "secrets", "") for verb in ("list", "watch", "create", "update", "patch", "delete")],
    # Events: created, never rewritten or read back.
    *[(verb, "", "events", "") for verb in ("update", "patch", "delete", "list")],
    *[(verb, "", "pods", "") for verb in ("get", "list", "create", "delete")],
    ("create", "", "pods", "exec"),
    ("get", "", "configmaps", ""),
    # Namespaces are read (labels), never written.
    *[(verb, "", "namespaces", "") for verb in ("create", "update", "patch", "delete")],
    ("create", "", "serviceaccounts", "token"),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("get", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", ""),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles", ""),
    ("impersonate", "", "serviceaccounts", ""),
]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d)
            for p in sorted(DEPLOY.glob("*.yaml")) for d in _docs(p)]


CONSOLE_FILE = "70-console-api.yaml"  # the console's aggregated API and its RBAC: checked on their own


def _by_kind(kind: str, *, console: bool = False) -> dict[str, Any]:
    (doc,) = [d for label, d in _manifests() if d["kind"] == kind and label.startswith(CONSOLE_FILE) == console]
    return doc


def _console_docs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in _docs(DEPLOY / CONSOLE_FILE)}


def _rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    out = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                resource, _, sub = res.partition("/")
                for verb in rule["verbs"]:
                    assert "*" not in (group, res, verb), rule
                    out.add((verb, group, resource, sub))
    return out


def status_of(fn: Any, *args: Any, **kwargs: Any) -> int:
    """The HTTP status a client call ends with (200 when it succeeds)."""
    try:
        fn(*args, **kwargs)
    except ApiException as err:
        return err.status
    return 200


# ------------------------------------------------------------------------------------ no apiserver


def test_chart_crds_are_identical_to_the_generated_ones() -> None:
    generated = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    copied = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert sorted(copied) == sorted(generated), "copy crds/*.yaml to charts/libvirt-operator/crds/"
    for name, data in generated.items():
        assert copied[name] == data, f"charts/libvirt-operator/crds/{name} differs from crds/{name}: copy it"


def test_cluster_role_grants_exactly_what_the_code_uses() -> None:
    """Least privilege, statically: no rule beyond REQUIRED, no wildcard, in the manifest and the chart."""
    role = _by_kind("ClusterRole")
    assert _rule_set(role["rules"]) == set(REQUIRED)
    # The chart's template, minus Go-template lines.
    text = (CHART / "templates" / "clusterrole.yaml").read_text()
    chart_role = yaml.safe_load("\n".join(ln for ln in text.splitlines() if "{{" not in ln))
    assert _rule_set(chart_role["rules"]) == set(REQUIRED)


# Leader election (--leader-elect): the operator's own Lease in its namespace, nothing more.
LEASE_NAME = "libvirt-operator"
LEASE_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
               {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [LEASE_NAME],
                "verbs": ["get", "update"]}]


def test_leader_election_role_is_the_lease_only() -> None:
    role, binding = _by_kind("Role"), _by_kind("RoleBinding")
    assert role["metadata"]["namespace"] == NAMESPACE and role["rules"] == LEASE_RULES
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]


def test_deployment_runs_the_operator_locked_down() -> None:
    dep = _by_kind("Deployment")
    # two replicas, one writer (leader election); rollouts start the new pod before stopping the old
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pdb = _by_kind("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = ctr["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in ctr["ports"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert ctr[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8081, "protocol": "TCP"} in ctr["ports"]
    assert "--liveness-port=8081" in ctr["args"] and "--metrics-port=8080" in ctr["args"]
    mounts = {m["mountPath"] for m in ctr["volumeMounts"]}
    assert {"/tmp", "/var/cache/libvirt-operator"} <= mounts
    assert all("emptyDir" in v for v in pod["volumes"])
    assert ctr["resources"]["requests"] and ctr["resources"]["limits"]
    assert re.fullmatch(r"libvirt-operator:[\w.-]+", ctr["image"])  # no registry host
    # The image's ENTRYPOINT plus these args is a valid command line of `libvirt-operator run`.
    from libvirt_operator.cli import main
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)[1])
    assert entrypoint[:2] == ["libvirt-operator", "run"] and "json" in entrypoint
    ctx = main.commands["run"].make_context("run", [*entrypoint[2:], *ctr["args"]])
    assert ctx.params["log_format"] == "json" and ctx.params["liveness_port"] == 8081
    assert ctx.params["iso_cache_dir"].startswith("/var/cache/libvirt-operator/")
    assert ctx.params["leader_elect"] is True and ctx.params["leader_election_id"] == LEASE_NAME
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in ctr["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    svc = _by_kind("Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


# ------------------------------------------------------------------------------------ on the apiserver


@pytest.fixture(scope="module")
def dyn(kube) -> DynamicClient:
    return DynamicClient(kube.api)


def _apply(dyn: DynamicClient, doc: dict[str, Any], **kwargs: Any) -> Any:
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    return resource, dyn.server_side_apply(resource, body=doc, field_manager=FIELD_MANAGER,
                                           force_conflicts=True, **kwargs)


@pytest.fixture(scope="module")
def rbac_installed(dyn) -> None:
    """Namespace, ServiceAccount, ClusterRole and ClusterRoleBinding, for real (idempotent)."""
    for kind in ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        _apply(dyn, _by_kind(kind))
    for (kind, _name), doc in _console_docs().items():
        if kind in ("ClusterRole", "ClusterRoleBinding", "RoleBinding"):
            _apply(dyn, doc)


@pytest.mark.parametrize("label", [label for label, _ in _manifests()])
def test_every_manifest_applies_with_server_side_dry_run(dyn, rbac_installed, label: str) -> None:
    doc = dict(_manifests())[label]
    resource, result = _apply(dyn, doc, dry_run="All")
    assert result.kind == doc["kind"] and result.metadata.name == doc["metadata"]["name"]
    if resource.namespaced:  # (the console's front-proxy CA reader is bound where the CA is published)
        assert result.metadata.namespace == ("kube-system" if "extension-apiserver" in label else NAMESPACE)
    if doc["kind"] == "Deployment":  # defaulting and validation ran: the pod template is complete
        assert result.spec.template.spec.containers[0].image == doc["spec"]["template"]["spec"]["containers"][0]["image"]


@pytest.fixture(scope="session")
def helm_binary() -> str:
    if shutil.which("go") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Go is needed to build helm for the chart tests (hack/ensure-helm.sh)")
        pytest.skip("no Go toolchain to build helm")
    out = subprocess.run(["bash", str(REPO / "hack" / "ensure-helm.sh")], check=True, capture_output=True,
                         text=True, timeout=1800)
    return out.stdout.strip().splitlines()[-1]


def _helm(helm: str, tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HELM_CACHE_HOME": str(tmp_path / "c"),
           "HELM_CONFIG_HOME": str(tmp_path / "g"), "HELM_DATA_HOME": str(tmp_path / "d")}
    return subprocess.run([helm, *args], env=env, check=check, capture_output=True, text=True)


@pytest.mark.parametrize("sets", [
    [],
    ["watchNamespaces={team-*,prod}", "remediationBaseUrl=https://runbooks.example/rag",
     "download.allow={10.0.0.0/8}", "download.deny={192.168.0.0/16}", "knowledgeBase.enabled=false",
     "leaderElection.leaseName=lvop-lock", "leaderElection.leaseDuration=20",
     "leaderElection.renewDeadline=12", "leaderElection.retryPeriod=2"],
], ids=["defaults", "namespaced"])
def test_helm_chart_renders_and_applies_with_server_side_dry_run(dyn, rbac_installed, tmp_path, sets,
                                                                helm_binary) -> None:
    """helm is built from the pinned module hack/helm (hack/ensure-helm.sh, cached by go.sum) with the
    Kubernetes version of its client-go: plain `helm template` (no --kube-version) satisfies the chart's
    kubeVersion."""
    args = ["template", "lvop", str(CHART), "--namespace", NAMESPACE]
    for value in sets:
        args += ["--set", value]
    rendered = _helm(helm_binary, tmp_path, *args).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert sorted(d["kind"] for d in docs) == ["APIService",  # the console (+ its Service, 2 ClusterRoles, bindings)
                                               *["ClusterRole"] * 3, *["ClusterRoleBinding"] * 2,
                                               "ConfigMap",  # Grafana dashboard
                                               "Deployment", "NetworkPolicy", "PodDisruptionBudget",
                                               "Role", "RoleBinding",  # the leader-election Lease
                                               "RoleBinding",  # extension-apiserver-authentication-reader
                                               "Service", "Service", "ServiceAccount",
                                               *["ValidatingAdmissionPolicy"] * 4,
                                               *["ValidatingAdmissionPolicyBinding"] * 4]
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    writers = policies["lvop-libvirt-operator-status-writers"]["spec"]["validations"][0]["expression"]
    assert f"'system:serviceaccount:{NAMESPACE}:lvop-libvirt-operator'" in writers
    for doc in docs:
        _apply(dyn, doc, dry_run="All")
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and "console" not in d["metadata"]["name"]]
    assert _rule_set(role["rules"]) == set(REQUIRED)
    chart_console = {(d["kind"], d["metadata"]["name"].replace("lvop-libvirt-operator", "libvirt-operator")): d
                     for d in docs if "console" in d["metadata"]["name"] or d["kind"] == "APIService"
                     or "extension-apiserver" in d["metadata"]["name"]}
    manifest_console = _console_docs()
    assert chart_console.keys() == manifest_console.keys()
    for key in (("ClusterRole", "libvirt-operator-console"), ("ClusterRole", "libvirt-operator-console-authorizer")):
        assert chart_console[key]["rules"] == manifest_console[key]["rules"]
    lease = "lvop-lock" if sets else "lvop-libvirt-operator"
    (lease_role,) = [d for d in docs if d["kind"] == "Role"]
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert lease_role["rules"] == [{**r, "resourceNames": [lease]} if "resourceNames" in r else r
                                   for r in LEASE_RULES]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["rollingUpdate"] == {
        "maxUnavailable": 0, "maxSurge": 1}
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    manifest_ctr = _by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert ctr["securityContext"] == manifest_ctr["securityContext"]
    assert ctr["env"] == manifest_ctr["env"]  # POD_NAME, POD_NAMESPACE from the downward API
    assert {"--leader-elect", f"--leader-election-id={lease}", f"--leader-election-namespace={NAMESPACE}"} \
        <= set(ctr["args"])
    from libvirt_operator.cli import main
    params = main.commands["run"].make_context("run", list(ctr["args"])).params
    assert params["leader_elect"] and params["leader_election_namespace"] == NAMESPACE
    if sets:
        assert {"--namespace=team-*", "--namespace=prod", "--no-knowledge-base",
                "--remediation-base-url=https://runbooks.example/rag", "--download-allow=10.0.0.0/8",
                "--download-deny=192.168.0.0/16"} <= set(ctr["args"])
        assert (params["leader_election_lease_duration"], params["leader_election_renew_deadline"],
                params["leader_election_retry_period"]) == (20, 12.0, 2.0)


def test_helm_chart_without_leader_election_runs_one_recreated_pod(tmp_path, helm_binary) -> None:
    rendered = _helm(helm_binary, tmp_path, "template", "lvop", str(CHART), "--namespace", NAMESPACE,
                     "--set", "leaderElection.enabled=false", "--set", "replicaCount=1").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = {d["kind"] for d in docs if "extension-apiserver" not in d["metadata"]["name"]}  # (the console's)
    assert not kinds & {"Role", "RoleBinding", "PodDisruptionBudget"}
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "--no-leader-elect" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_helm_lint_passes(tmp_path, helm_binary) -> None:
    res = _helm(helm_binary, tmp_path, "lint", str(CHART), "--strict", check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(("value", "message"), [
    ("replicaCount=two", "at '/replicaCount': got string, want integer"),
    ("replicaCount=0", "at '/replicaCount': minimum: got 0, want 1"),
    ("logLevel=LOUD", "at '/logLevel': value must be one of"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
    ("metrics.port=70000", "at '/metrics/port': maximum"),
    ("download.maxSize=lots", "at '/download/maxSize'"),
    ("download.allow={not-a-cidr}", "at '/download/allow/0'"),
    ("download.maxConcurrentImports=0", "at '/download/maxConcurrentImports': minimum"),
    ("replicas=3", "additional properties 'replicas' not allowed"),  # a typo of replicaCount
    ("leaderElection.enabled=false", "at '/replicaCount': maximum: got 2, want 1"),  # two writers
    ("leaderElection.leaseDuration=5", "leaseDuration (5) must be longer than leaderElection.renewDeadline (7)"),
    ("leaderElection.retryPeriod=6", "renewDeadline (7) must be longer than 1.2 × leaderElection.retryPeriod (6)"),
    ("leaderElection.leaseName=Not_A_Name", "at '/leaderElection/leaseName'"),
])
def test_helm_refuses_wrong_values_with_a_clear_message(tmp_path, helm_binary, value: str, message: str) -> None:
    """values.schema.json (types, enums, ranges; unknown keys) and the template's cross-field checks fail
    `helm template` -- hence `helm install`/`upgrade`, which validate the same way -- before anything applies."""
    res = _helm(helm_binary, tmp_path, "template", "lvop", str(CHART), "--set", value, check=False)
    assert res.returncode != 0 and message in res.stderr, res.stderr


def _pod_from_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": template["metadata"]["labels"]},
            "spec": copy.deepcopy(template["spec"])}


def test_operator_pod_is_admitted_under_the_restricted_pod_security_profile(kube, rbac_installed) -> None:
    """The namespace enforces `restricted`; PodSecurity admission judges a Pod built from the template."""
    ns = kube.core.read_namespace(NAMESPACE)
    assert ns.metadata.labels.get("pod-security.kubernetes.io/enforce") == "restricted"
    template = _by_kind("Deployment")["spec"]["template"]
    kube.core.create_namespaced_pod(NAMESPACE, _pod_from_template("operator-dry-run", template), dry_run="All")
    # Control: the same pod without its hardening is refused, so the admission above was a real check.
    weak = _pod_from_template("weak-dry-run", template)
    del weak["spec"]["securityContext"]
    del weak["spec"]["containers"][0]["securityContext"]
    with pytest.raises(ApiException) as info:
        kube.core.create_namespaced_pod(NAMESPACE, weak, dry_run="All")
    assert info.value.status == 403 and "PodSecurity" in info.value.body


# ------------------------------------------------------------------------------------ RBAC as the operator


@pytest.fixture(scope="module")
def sa_api(kube, kubeconfig, rbac_installed, tmp_path_factory) -> client.ApiClient:
    """An API client authenticated as system:serviceaccount:libvirt-operator:libvirt-operator."""
    token = kube.core.create_namespaced_service_account_token(
        SERVICE_ACCOUNT, NAMESPACE, {"spec": {"expirationSeconds": 3600}}).status.token
    admin = json.loads(Path(kubeconfig).read_text())  # controlplane.py writes JSON
    cluster = admin["clusters"][0]["cluster"]
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {
            "server": cluster["server"], "certificate-authority-data": cluster["certificate-authority-data"]}}],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "envtest", "user": SERVICE_ACCOUNT,
                                                      "namespace": NAMESPACE}}],
        "current-context": "operator",
    }
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return config.new_client_from_config(config_file=str(path))


def _can_i(api: client.ApiClient, verb: str, group: str, resource: str, sub: str,
           namespace: str | None) -> bool:
    review = client.AuthorizationV1Api(api).create_self_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                        "subresource": sub, "namespace": namespace}}})
    return bool(review.status.allowed)


def test_the_token_authenticates_as_the_operator_service_account(sa_api) -> None:
    review = client.AuthenticationV1Api(sa_api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert review.status.user_info.username == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"


@pytest.mark.parametrize("namespace", [None, "some-team"], ids=["all-namespaces", "one-namespace"])
def test_rbac_allows_everything_the_operator_does(sa_api, namespace: str | None) -> None:
    denied = [r for r in REQUIRED
              if not _can_i(sa_api, *r, namespace=None if r[2] in ("libvirthosts", "customresourcedefinitions")
                            else namespace)]
    assert denied == [], f"the operator's ServiceAccount may not: {denied}"


@pytest.mark.parametrize("namespace", [None, NAMESPACE, "some-team"])
def test_rbac_denies_what_the_operator_never_does(sa_api, namespace: str | None) -> None:
    allowed = [r for r in FORBIDDEN if _can_i(sa_api, *r, namespace=namespace)]
    assert allowed == [], f"the operator's ServiceAccount should not be allowed: {allowed}"


def test_real_requests_as_the_operator(kube, sa_api, namespace) -> None:
    """The same calls the operator makes, as its ServiceAccount: 404 (authorized) where it may, 403 where not."""
    custom = client.CustomObjectsApi(sa_api)
    core = client.CoreV1Api(sa_api)
    # list + watch, cluster-wide, as kopf and KubeClient.list_objects do
    for plural in KINDS:
        custom.list_cluster_custom_object(GROUP, "v1alpha1", plural, limit=1)
        custom.list_cluster_custom_object(GROUP, "v1alpha1", plural, watch=True, timeout_seconds=1,
                                          _preload_content=False).release_conn()
    client.ApiextensionsV1Api(sa_api).list_custom_resource_definition(limit=1)

    merge = {"_content_type": "application/merge-patch+json"}
    # patch (main resource and /status) is authorized: the object is merely absent
    assert status_of(custom.patch_namespaced_custom_object, GROUP, "v1alpha1", namespace, "virtualmachines",
                     "absent", {"metadata": {"finalizers": []}}, **merge) == 404
    assert status_of(custom.patch_namespaced_custom_object_status, GROUP, "v1alpha1", namespace, "isoimages",
                     "absent", {"status": {}}, **merge) == 404
    assert status_of(custom.patch_cluster_custom_object_status, GROUP, "v1alpha1", "libvirthosts",
                     "absent", {"status": {}}, **merge) == 404
    # update (PUT), create and delete of user objects are refused
    vm = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "absent"},
          "spec": {}}
    assert status_of(custom.replace_namespaced_custom_object, GROUP, "v1alpha1", namespace, "virtualmachines",
                     "absent", vm) == 403
    assert status_of(custom.create_namespaced_custom_object, GROUP, "v1alpha1", namespace, "virtualmachines",
                     vm) == 403
    assert status_of(custom.delete_namespaced_custom_object, GROUP, "v1alpha1", namespace, "virtualmachines",
                     "absent") == 403
    # Secrets: get by name yes; list, delete no
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "host-ssh"},
                                                   "stringData": {"known_hosts": "h ssh-ed25519 AAAA"}})
    assert core.read_namespaced_secret("host-ssh", namespace).data
    assert status_of(core.list_namespaced_secret, namespace) == 403
    assert status_of(core.delete_namespaced_secret, "host-ssh", namespace) == 403
    # Events: created (as kopf.event does)
    core.create_namespaced_event(namespace, {
        "metadata": {"generateName": "libvirt-operator-"},
        "involvedObject": {"apiVersion": f"{GROUP}/v1alpha1", "kind": "VirtualMachine", "name": "absent",
                           "namespace": namespace},
        "reason": "RbacCheck", "message": "created by the operator's ServiceAccount", "type": "Normal",
        "source": {"component": "libvirt-operator"}})
    # Namespaces: listed (one, by field selector, as KubeClient.namespace_labels does), never patched
    assert [n.metadata.name for n in core.list_namespace(field_selector=f"metadata.name={namespace}").items] \
        == [namespace]
    assert status_of(core.patch_namespace, namespace, {"metadata": {"labels": {"x": "y"}}}) == 403
    # no Pods, no ConfigMaps
    assert status_of(core.list_namespaced_pod, namespace) == 403
    assert status_of(core.read_namespaced_config_map, "kube-root-ca.crt", namespace) == 403


def test_lease_requests_as_the_operator(kube, sa_api, namespace) -> None:
    """Leader election as the operator's ServiceAccount: its own Lease in its namespace (create, get,
    update), nothing else (another Lease, list, delete, another namespace: 403)."""
    coord, admin = client.CoordinationV1Api(sa_api), client.CoordinationV1Api(kube.api)
    with contextlib.suppress(ApiException):
        admin.delete_namespaced_lease(LEASE_NAME, NAMESPACE)

    body = {"metadata": {"name": LEASE_NAME}, "spec": {"holderIdentity": "rbac-check", "leaseDurationSeconds": 10}}
    coord.create_namespaced_lease(NAMESPACE, body)
    try:
        lease = coord.read_namespaced_lease(LEASE_NAME, NAMESPACE)
        lease.spec.holder_identity = "rbac-check-2"
        coord.replace_namespaced_lease(LEASE_NAME, NAMESPACE, lease)
        assert coord.read_namespaced_lease(LEASE_NAME, NAMESPACE).spec.holder_identity == "rbac-check-2"
        assert status_of(coord.delete_namespaced_lease, LEASE_NAME, NAMESPACE) == 403
        assert status_of(coord.list_namespaced_lease, NAMESPACE) == 403
        assert status_of(coord.read_namespaced_lease, "kube-controller-manager", NAMESPACE) == 403
        assert status_of(coord.create_namespaced_lease, namespace, body) == 403
    finally:
        admin.delete_namespaced_lease(LEASE_NAME, NAMESPACE)


def test_console_rbac_is_the_subresource_for_users_and_the_review_for_the_operator() -> None:
    docs = _console_docs()
    assert _rule_set(docs[("ClusterRole", "libvirt-operator-console")]["rules"]) == {
        ("get", "subresources.virt.libvirt-operator.io", "virtualmachines", "console")}
    assert _rule_set(docs[("ClusterRole", "libvirt-operator-console-authorizer")]["rules"]) == {
        ("create", "authorization.k8s.io", "subjectaccessreviews", "")}
    reader = docs[("RoleBinding", "libvirt-operator-extension-apiserver-authentication-reader")]
    assert reader["metadata"]["namespace"] == "kube-system"
    assert reader["roleRef"]["name"] == "extension-apiserver-authentication-reader"
    service, apiservice = docs[("Service", "libvirt-operator-console")], docs[("APIService", "v1alpha1.subresources.virt.libvirt-operator.io")]
    assert apiservice["spec"]["service"] == {"name": service["metadata"]["name"], "namespace": NAMESPACE, "port": 443}
    dep = _by_kind("Deployment")
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "console", "containerPort": 8443, "protocol": "TCP"} in ctr["ports"]
    assert "--console-port=8443" in ctr["args"]
    assert f"--console-service-name=libvirt-operator-console.{NAMESPACE}.svc" in ctr["args"]


def test_the_operator_may_read_the_front_proxy_ca_and_review_access(sa_api) -> None:
    """What the console API does at start and per console, as the operator's ServiceAccount."""
    cm = client.CoreV1Api(sa_api).read_namespaced_config_map("extension-apiserver-authentication", "kube-system")
    assert "requestheader-client-ca-file" in cm.data
    review = client.AuthorizationV1Api(sa_api).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": "someone", "resourceAttributes": {
                "verb": "get", "group": "subresources.virt.libvirt-operator.io", "resource": "virtualmachines",
                "subresource": "console", "namespace": "default", "name": "vm"}}})
    assert review.status.allowed is False
    assert not _can_i(sa_api, "get", "", "configmaps", "", "kube-system")  # that one ConfigMap only
