"""The Helm chart and the kustomize overlays, rendered offline and checked object by object.

What a cluster would enforce or what an operator relies on: strict schemas,
the restricted Pod Security Standard, probes on the relay's real endpoints,
one SQLite replica vs N PostgreSQL replicas, secrets only from Secrets,
HTTP/2 cleartext to the Service, consistent labels and selectors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from deploy import render

Manifest = render.Manifest
WORKLOAD_KINDS = ("StatefulSet", "Deployment")
SELECTOR = {"app.kubernetes.io/name": "tetherless", "app.kubernetes.io/instance": "tetherless"}
SECRET_LOOKING = re.compile(r"DATABASE|PASSWORD|SECRET|TOKEN|TLS_KEY|RELAY_KEY|PRIVATE", re.IGNORECASE)
SCENARIO_NAMES = [path.name for path in render.SCENARIOS]
METRICS_LABEL = "tetherless.dev/metrics"
OVERLAY_NAMES = [path.name for path in render.OVERLAYS]


# -- helpers --------------------------------------------------------------------


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def only(manifests: list[Manifest], kind: str) -> Manifest:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def workload(manifests: list[Manifest]) -> Manifest:
    workloads = [m for m in manifests if m["kind"] in WORKLOAD_KINDS]
    assert len(workloads) == 1, [m["kind"] for m in workloads]
    return workloads[0]


def relay_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "relay"]
    return container


def config_env(manifests: list[Manifest]) -> dict[str, str]:
    return dict(only(manifests, "ConfigMap")["data"])


def all_rendered(
    scenarios: dict[str, list[Manifest]], overlays: dict[str, list[Manifest]]
) -> Iterator[tuple[str, list[Manifest]]]:
    yield from ((f"helm {name}", ms) for name, ms in scenarios.items())
    yield from ((f"kustomize {name}", ms) for name, ms in overlays.items())


@pytest.fixture(scope="module")
def everything(
    rendered_scenarios: dict[str, list[Manifest]], built_overlays: dict[str, list[Manifest]]
) -> list[tuple[str, list[Manifest]]]:
    return list(all_rendered(rendered_scenarios, built_overlays))


# -- lint and strict schemas ------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_helm_lint_strict_is_clean(require: Callable[[str], str], scenario: str) -> None:
    require("helm_python")
    assert render.lint_chart(render.load_values(render.CHART / "ci" / scenario)) == []


def test_every_object_passes_strict_kubernetes_schemas(
    require: Callable[[str], str], everything: list[tuple[str, list[Manifest]]]
) -> None:
    require("kubernetes_validate")
    problems = [f"{what}: {problem}" for what, manifests in everything for problem in render.validate(manifests)]
    assert problems == []


def test_the_chart_needs_a_relay_name(require: Callable[[str], str]) -> None:
    helm_python = pytest.importorskip(require("helm_python"))
    with pytest.raises(helm_python.HelmRenderError, match=r"relay\.name is required"):
        render.render_chart({})


def test_the_grace_period_must_cover_the_drain(require: Callable[[str], str]) -> None:
    helm_python = pytest.importorskip(require("helm_python"))
    values = {"relay": {"name": "r.example.org", "drainTimeoutSeconds": 30}, "terminationGracePeriodSeconds": 30}
    with pytest.raises(helm_python.HelmRenderError, match="terminationGracePeriodSeconds must exceed"):
        render.render_chart(values)


# -- pod security and probes ------------------------------------------------------


def test_pods_meet_the_restricted_pod_security_standard(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        pod = workload(manifests)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, what
        assert pod["securityContext"]["runAsUser"] == 10001, what
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, what
        assert pod["automountServiceAccountToken"] is False, what
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, what
            assert context["runAsUser"] == 10001, what
            assert context["allowPrivilegeEscalation"] is False, what
            assert context["readOnlyRootFilesystem"] is True, what
            assert context["capabilities"]["drop"] == ["ALL"], what
            assert "add" not in context["capabilities"], what
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, what
            assert not context.get("privileged", False), what
        for volume in pod["volumes"]:
            assert "hostPath" not in volume, what


def test_writable_paths_are_only_data_and_tmp(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        pod = workload(manifests)["spec"]["template"]["spec"]
        mounts = relay_container(pod)["volumeMounts"]
        writable = sorted(m["mountPath"] for m in mounts if not m.get("readOnly"))
        assert writable == ["/data", "/tmp"], what
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["tmp"], what


def test_probes_use_the_relay_endpoints_on_its_port(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        pod = workload(manifests)["spec"]["template"]["spec"]
        container = relay_container(pod)
        assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}, what
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}, what
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, what
        (port,) = [p for p in container["ports"] if p["name"] == "http"]
        listen = config_env(manifests)["TETHERLESS_LISTEN"]
        assert listen == f"0.0.0.0:{port['containerPort']}", what
        assert config_env(manifests)["TETHERLESS_DATA"] == "/data", what


def test_termination_grace_covers_prestop_and_drain(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        pod = workload(manifests)["spec"]["template"]["spec"]
        sleep = int(relay_container(pod)["lifecycle"]["preStop"]["exec"]["command"][1])
        drain = float(config_env(manifests)["TETHERLESS_DRAIN_TIMEOUT_SECONDS"])
        assert pod["terminationGracePeriodSeconds"] > sleep + drain, what


# -- shapes: one SQLite replica, N PostgreSQL replicas ------------------------------


def shape(manifests: list[Manifest]) -> str:
    return "postgresql" if "TETHERLESS_DATABASE" in env_names(manifests) else "sqlite"


def env_names(manifests: list[Manifest]) -> set[str]:
    container = relay_container(workload(manifests)["spec"]["template"]["spec"])
    return {e["name"] for e in container.get("env", [])}


def test_sqlite_is_one_statefulset_replica_with_a_volume(everything: list[tuple[str, list[Manifest]]]) -> None:
    sqlite = [(what, ms) for what, ms in everything if shape(ms) == "sqlite"]
    assert len(sqlite) >= 3
    for what, manifests in sqlite:
        statefulset = workload(manifests)
        assert statefulset["kind"] == "StatefulSet", what
        assert statefulset["spec"]["replicas"] == 1, what
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data", what
        assert "ReadWriteOnce" in claim["spec"]["accessModes"], what
        headless = {s["metadata"]["name"]: s for s in of_kind(manifests, "Service")}[statefulset["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None", what
        assert not of_kind(manifests, "HorizontalPodAutoscaler"), what
        assert not of_kind(manifests, "PodDisruptionBudget"), what


def test_postgresql_is_a_deployment_with_secrets_for_url_and_relay_key(
    everything: list[tuple[str, list[Manifest]]],
) -> None:
    postgres = [(what, ms) for what, ms in everything if shape(ms) == "postgresql"]
    assert len(postgres) >= 3
    for what, manifests in postgres:
        deployment = workload(manifests)
        assert deployment["kind"] == "Deployment", what
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, what
        pod = deployment["spec"]["template"]["spec"]
        container = relay_container(pod)
        (database,) = [e for e in container["env"] if e["name"] == "TETHERLESS_DATABASE"]
        assert set(database["valueFrom"]) == {"secretKeyRef"}, what
        (key_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data/relay.key"]
        assert key_mount["readOnly"] is True, what
        assert key_mount["subPath"] == "relay.key", what
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["data"], what
        assert volumes[key_mount["name"]]["secret"]["items"][0]["path"] == "relay.key", what
        assert not of_kind(manifests, "PersistentVolumeClaim"), what
        # The rotation file comes from the same Secret, so every replica sees the same retired keys.
        (rotation,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data/relay-keys.json"]
        assert rotation["readOnly"] is True, what
        assert rotation["name"] == key_mount["name"], what
        items = {item["path"]: item["key"] for item in volumes[key_mount["name"]]["secret"]["items"]}
        assert items == {"relay.key": "relay.key", "relay-keys.json": "relay-keys.json"}, what


def test_replicas_follow_the_scenario(rendered_scenarios: dict[str, list[Manifest]]) -> None:
    ha = rendered_scenarios["postgres-ha-values.yaml"]
    assert "replicas" not in workload(ha)["spec"], "the HPA owns the replica count"
    hpa = only(ha, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tetherless"}
    assert hpa["spec"]["minReplicas"] == 3
    gateway = rendered_scenarios["gateway-values.yaml"]
    assert workload(gateway)["spec"]["replicas"] == 2
    assert not of_kind(gateway, "HorizontalPodAutoscaler")


@pytest.mark.parametrize(("pdb", "hpa"), [(False, False), (True, False), (False, True), (True, True)])
def test_pdb_and_hpa_only_when_enabled(require: Callable[[str], str], pdb: bool, hpa: bool) -> None:
    require("helm_python")
    values = render.load_values(render.CHART / "ci" / "postgres-ha-values.yaml")
    values["podDisruptionBudget"]["enabled"] = pdb
    values["autoscaling"]["enabled"] = hpa
    manifests, _ = render.render_chart(values)
    assert len(of_kind(manifests, "PodDisruptionBudget")) == int(pdb)
    assert len(of_kind(manifests, "HorizontalPodAutoscaler")) == int(hpa)
    assert ("replicas" in workload(manifests)["spec"]) is not hpa


def test_optional_objects_are_off_by_default(rendered_scenarios: dict[str, list[Manifest]]) -> None:
    kinds = {m["kind"] for m in rendered_scenarios["sqlite-default-values.yaml"]}
    assert kinds == {"ConfigMap", "Service", "ServiceAccount", "StatefulSet"}


# -- metrics on their own listener ----------------------------------------------------------


def test_metrics_have_their_own_port_and_service(everything: list[tuple[str, list[Manifest]]]) -> None:
    """Chart defaults and both overlays: /metrics on port 9090 only, behind tetherless-metrics."""
    for what, manifests in everything:
        env = config_env(manifests)
        assert env["TETHERLESS_METRICS_LISTEN"] == "0.0.0.0:9090", what
        assert env["TETHERLESS_METRICS_ON_MAIN_PORT"] == "false", what
        pod = workload(manifests)["spec"]["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for p in relay_container(pod)["ports"]}
        assert ports == {"http": 8080, "metrics": 9090}, what
        services = {s["metadata"]["name"]: s for s in of_kind(manifests, "Service")}
        metrics = services["tetherless-metrics"]
        assert metrics["metadata"]["labels"][METRICS_LABEL] == "true", what
        assert [p["port"] for p in metrics["spec"]["ports"]] == [9090], what
        others = [s for name, s in services.items() if name != "tetherless-metrics"]
        assert all(p["name"] == "http" for s in others for p in s["spec"]["ports"]), what


def test_metrics_port_zero_serves_metrics_on_the_client_port(require: Callable[[str], str]) -> None:
    require("helm_python")
    values = render.load_values(render.CHART / "ci" / "postgres-ha-values.yaml")
    values["metrics"]["port"] = 0
    manifests, _ = render.render_chart(values)
    assert "TETHERLESS_METRICS_LISTEN" not in config_env(manifests)
    assert "tetherless-metrics" not in {s["metadata"]["name"] for s in of_kind(manifests, "Service")}
    monitor = only(manifests, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == SELECTOR
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    (ingress,) = only(manifests, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_metrics_port_must_differ_from_the_relay_port(require: Callable[[str], str]) -> None:
    helm_python = pytest.importorskip(require("helm_python"))
    values = {"relay": {"name": "r.example.org"}, "metrics": {"port": 8080}}
    with pytest.raises(helm_python.HelmRenderError, match=r"metrics\.port must differ from containerPort"):
        render.render_chart(values)


# -- secrets, services, labels --------------------------------------------------------


def test_no_secret_ever_lands_in_a_configmap(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        assert not of_kind(manifests, "Secret"), f"{what}: secrets are referenced (existingSecret), never rendered"
        for configmap in of_kind(manifests, "ConfigMap"):
            for key, value in configmap.get("data", {}).items():
                assert not SECRET_LOOKING.search(key), f"{what}: {key}"
                assert "://" not in value or not value.startswith("postgres"), f"{what}: {key}"
        pod = workload(manifests)["spec"]["template"]["spec"]
        for env in relay_container(pod).get("env", []):
            if SECRET_LOOKING.search(env["name"]):
                assert "value" not in env, f"{what}: {env['name']} must come from a Secret"


def test_services_speak_h2c_to_the_named_port(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        for service in of_kind(manifests, "Service"):
            assert service["spec"]["selector"] == SELECTOR, what
            for port in service["spec"]["ports"]:
                if port["name"] == "metrics":  # the separate /metrics listener: plain HTTP, never public
                    assert (port["appProtocol"], port["targetPort"]) == ("http", "metrics"), what
                    assert service["spec"]["type"] == "ClusterIP", what
                    assert len(service["spec"]["ports"]) == 1, f"{what}: the metrics Service exposes only metrics"
                    continue
                assert port["appProtocol"] == "kubernetes.io/h2c", what
                assert port["targetPort"] == "http", what


def test_labels_and_selectors_agree(everything: list[tuple[str, list[Manifest]]]) -> None:
    for what, manifests in everything:
        for manifest in manifests:
            labels = manifest["metadata"].get("labels", {})
            assert labels.items() >= SELECTOR.items(), f"{what}: {manifest['kind']} lacks the selector labels"
            assert labels.get("app.kubernetes.io/part-of") == "tetherless", f"{what}: {manifest['kind']}"
        spec = workload(manifests)["spec"]
        assert spec["selector"]["matchLabels"] == SELECTOR, what
        assert spec["template"]["metadata"]["labels"].items() >= SELECTOR.items(), what
        for manifest in of_kind(manifests, "PodDisruptionBudget"):
            assert manifest["spec"]["selector"]["matchLabels"] == SELECTOR, what
        for manifest in of_kind(manifests, "ServiceMonitor"):  # selects the metrics Service
            assert manifest["spec"]["selector"]["matchLabels"] == {**SELECTOR, METRICS_LABEL: "true"}, what
        for policy in of_kind(manifests, "NetworkPolicy"):
            assert policy["spec"]["podSelector"]["matchLabels"] == SELECTOR, what


def test_helm_labels_follow_chart_conventions(rendered_scenarios: dict[str, list[Manifest]]) -> None:
    for name, manifests in rendered_scenarios.items():
        for manifest in manifests:
            labels = manifest["metadata"]["labels"]
            assert labels["helm.sh/chart"] == "tetherless-0.1.0", name
            assert labels["app.kubernetes.io/managed-by"] == "Helm", name
            assert labels["app.kubernetes.io/version"] == "0.1.0", name


def test_config_changes_roll_the_pods(require: Callable[[str], str]) -> None:
    require("helm_python")
    values = render.load_values(render.CHART / "ci" / "sqlite-default-values.yaml")
    before = workload(render.render_chart(values)[0])["spec"]["template"]["metadata"]["annotations"]
    values["config"] = {"max_body_bytes": 1048576}
    after_manifests, _ = render.render_chart(values)
    after = workload(after_manifests)["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/config"] != after["checksum/config"]
    assert config_env(after_manifests)["TETHERLESS_MAX_BODY_BYTES"] == "1048576"


# -- exposure: Ingress, HTTPRoute, ServiceMonitor, NetworkPolicy --------------------------------


def test_ingress_and_httproute_target_the_service(rendered_scenarios: dict[str, list[Manifest]]) -> None:
    ingress = only(rendered_scenarios["postgres-ha-values.yaml"], "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "tetherless", "port": {"name": "http"}}
    route = only(rendered_scenarios["gateway-values.yaml"], "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"][0]["name"] == "public"
    assert route["spec"]["hostnames"] == ["relay.example.org"]
    (route_rule,) = route["spec"]["rules"]
    assert route_rule["backendRefs"] == [{"name": "tetherless", "port": 8080}]


def test_servicemonitor_scrapes_metrics(rendered_scenarios: dict[str, list[Manifest]]) -> None:
    monitor = only(rendered_scenarios["postgres-ha-values.yaml"], "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("metrics", "/metrics", "http")


def test_networkpolicy_opens_the_relay_port_the_database_and_the_object_store_only(
    rendered_scenarios: dict[str, list[Manifest]],
) -> None:
    policy = only(rendered_scenarios["postgres-ha-values.yaml"], "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    clients, scrapers = policy["spec"]["ingress"]
    assert clients["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert clients["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert scrapers["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert scrapers["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert sorted(egress_ports) == [53, 53, 5432, 8333]
    (storage_rule,) = [r for r in policy["spec"]["egress"] if r["ports"] == [{"port": 8333, "protocol": "TCP"}]]
    assert storage_rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "storage"}}}]
    open_policy = only(rendered_scenarios["sqlite-relay-key-values.yaml"], "NetworkPolicy")
    assert open_policy["spec"]["policyTypes"] == ["Ingress"]
    assert "from" not in open_policy["spec"]["ingress"][0]


def test_sqlite_relay_key_from_a_secret_is_mounted_over_the_volume(
    rendered_scenarios: dict[str, list[Manifest]],
) -> None:
    pod = workload(rendered_scenarios["sqlite-relay-key-values.yaml"])["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in relay_container(pod)["volumeMounts"]}
    assert mounts["/data"]["name"] == "data"
    assert mounts["/data/relay.key"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "data" not in volumes, "the data volume is the StatefulSet's claim"
    assert volumes["relay-key"]["secret"]["secretName"] == "tetherless-relay-key"
    # One process: a rotation writes relay-keys.json on the claim, so it is not taken from the Secret.
    assert "/data/relay-keys.json" not in mounts
    default = workload(rendered_scenarios["sqlite-default-values.yaml"])["spec"]["template"]["spec"]
    assert "/data/relay.key" not in {m["mountPath"] for m in relay_container(default)["volumeMounts"]}


# -- the plain manifests agree with the chart ----------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "scenario"),
    [("sqlite", "sqlite-default-values.yaml"), ("postgres", "postgres-ha-values.yaml")],
)
def test_kustomize_pod_spec_matches_the_chart(
    rendered_scenarios: dict[str, list[Manifest]],
    built_overlays: dict[str, list[Manifest]],
    overlay: str,
    scenario: str,
) -> None:
    plain = workload(built_overlays[overlay])
    chart = workload(rendered_scenarios[scenario])
    assert plain["kind"] == chart["kind"]
    plain_pod, chart_pod = plain["spec"]["template"]["spec"], chart["spec"]["template"]["spec"]
    for field in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
        assert plain_pod[field] == chart_pod[field], field
    plain_container, chart_container = relay_container(plain_pod), relay_container(chart_pod)
    for field in ("securityContext", "ports", "args", "startupProbe", "livenessProbe", "readinessProbe", "lifecycle"):
        assert plain_container[field] == chart_container[field], field
    assert sorted(m["mountPath"] for m in plain_container["volumeMounts"]) == sorted(
        m["mountPath"] for m in chart_container["volumeMounts"]
    )
    plain_env, chart_env = config_env(built_overlays[overlay]), config_env(rendered_scenarios[scenario])
    assert set(plain_env) == {k for k in chart_env if not k.startswith("TETHERLESS_MAX_")}


def test_media_storage_s3_settings_in_the_configmap_and_credentials_from_the_secret(
    rendered_scenarios: dict[str, list[Manifest]],
) -> None:
    manifests = rendered_scenarios["postgres-ha-values.yaml"]
    config = only(manifests, "ConfigMap")["data"]
    assert config["TETHERLESS_BLOB_STORAGE"] == "s3"
    assert config["TETHERLESS_BLOB_BUCKET"] == "tetherless-media"
    assert config["AWS_ENDPOINT_URL"] == "http://seaweedfs-s3.storage:8333"
    assert config["AWS_REGION"] == "us-east-1"
    assert not any("SECRET" in key or "ACCESS_KEY" in key for key in config), "credentials never go to the ConfigMap"
    env = {e["name"]: e for e in relay_container(workload(manifests)["spec"]["template"]["spec"])["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "tetherless-s3", "key": name}
    aws = only(rendered_scenarios["gateway-values.yaml"], "ConfigMap")["data"]
    assert "AWS_ENDPOINT_URL" not in aws, "no endpoint URL: AWS's own regional endpoint"
    assert aws["AWS_REGION"] == "eu-central-1"
    sqlite = only(rendered_scenarios["sqlite-default-values.yaml"], "ConfigMap")["data"]
    assert sqlite["TETHERLESS_BLOB_STORAGE"] == "files"
    assert "TETHERLESS_BLOB_BUCKET" not in sqlite
