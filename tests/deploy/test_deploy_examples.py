"""The deployment examples in deploy/ agree with the gateway they deploy: the configs they carry
parse with the gateway's own reader, and every port, path, file and name that the manifests, the
compose file and nginx's config point at is the one the gateway configs define."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import Gateway
from gateway.config import Address, Settings, parse_settings
from tests.deploy.examples import (
    COMPOSE,
    DEPLOY,
    GATEWAY_DOCKERFILE,
    K8S,
    REPO,
    Directive,
    apps_of,
    compose,
    compose_gateways,
    container_port,
    environment,
    free_port,
    host_file,
    image_name,
    interpolate,
    k8s_documents,
    k8s_gateway,
    k8s_object,
    k8s_objects,
    lb_service,
    mounts,
    nginx_bytes,
    nginx_seconds,
    nginx_site,
    option,
    read_dockerfile,
    secret_value,
)

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_every_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def url_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname and parts.port, f"{url} needs a host and a port"
    return parts.hostname, parts.port


def metrics_address(settings: Settings) -> Address:
    return settings.metrics_listen or settings.internal_listen


# --- Kubernetes -------------------------------------------------------------------------------


def test_every_manifest_is_a_named_kubernetes_object() -> None:
    documents = k8s_documents()
    assert documents, "deploy/kubernetes holds no manifests"
    seen = set()
    for path, doc in documents:
        where = path.relative_to(REPO)
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{where}: {doc.keys()}"
        name = doc["metadata"].get("name")
        assert name, f"{where}: a {doc['kind']} without metadata.name"
        assert (doc["kind"], name) not in seen, f"{where}: {doc['kind']} {name} twice"
        seen.add((doc["kind"], name))
    kinds = {kind for kind, _ in seen}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "NetworkPolicy"} <= kinds


def test_configmap_holds_a_postgres_gateway_config() -> None:
    gateway = k8s_gateway()  # parse_settings(..., read_key=False) raises on any bad key
    assert gateway.settings.postgres, gateway.settings.store
    assert gateway.settings.routes, "the gateway would answer 404 to everything"
    assert any(route.durable for route in gateway.settings.routes)


def test_gateway_is_a_native_sidecar() -> None:
    gateway = k8s_gateway()
    assert gateway.group == "initContainers", "the gateway must start before the app"
    assert gateway.container.get("restartPolicy") == "Always", (
        "an init container without restartPolicy: Always would have to exit before the app starts"
    )
    apps = gateway.pod.get("containers", [])
    assert apps, "the pod has no app container"
    # A startup probe holds the app back until the gateway listens.
    assert "startupProbe" in gateway.container


def test_routes_point_at_the_app_in_the_same_pod() -> None:
    gateway = k8s_gateway()
    (app,) = gateway.pod["containers"]
    arguments = [*app.get("command", []), *app.get("args", [])]
    app_host, app_port = option(arguments, "--host"), option(arguments, "--port")
    assert app_host and app_port, f"the app's address is not in its arguments: {arguments}"
    assert is_loopback(app_host), "the app should be reachable only through the gateway"
    for route in gateway.settings.routes:
        host, port = url_address(route.upstream)
        assert is_loopback(host), f"route {route.name}: {route.upstream} leaves the pod"
        assert port == int(app_port), f"route {route.name}: {route.upstream}, app on {app_port}"
    # The app calls back on loopback, on the internal listener's port.
    host, port = url_address(gateway.settings.internal_url)
    assert is_loopback(host) and port == gateway.settings.internal_listen.port


def test_internal_listener_stays_on_loopback() -> None:
    gateway = k8s_gateway()
    settings = gateway.settings
    internal = settings.internal_listen
    # The admin API is on it, without authentication unless admin_token is set.
    assert is_loopback(internal.host), f"internal_listen {internal} answers on the pod's IP"
    assert internal.port not in {settings.listen.port, metrics_address(settings).port}
    declared = {p["containerPort"] for p in gateway.container["ports"]}
    assert internal.port not in declared, "a containerPort for a loopback-only listener"


def test_probes_hit_the_metrics_listener() -> None:
    gateway = k8s_gateway()
    metrics = gateway.settings.metrics_listen
    # Without metrics_listen the probes would need the internal listener on the pod's IP.
    assert metrics is not None, "no metrics_listen: nothing on the pod's IP serves the probes"
    # The kubelet connects to the pod's IP: a listener on loopback would fail every probe.
    assert is_every_address(metrics.host), f"metrics_listen {metrics} is not on the pod's IP"
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        check = gateway.container[probe]["httpGet"]
        assert check["path"] == path, f"{probe} asks {check['path']}"
        port = container_port(gateway.container, check["port"])
        assert port == metrics.port, f"{probe} asks port {port}, metrics_listen is {metrics}"
        assert "host" not in check, f"{probe} names a host; the kubelet should ask the pod's IP"
        assert check.get("scheme", "HTTP") == "HTTP", probe


def test_prometheus_annotations_match_the_metrics_listener() -> None:
    gateway = k8s_gateway()
    annotations = gateway.deployment["spec"]["template"]["metadata"]["annotations"]
    metrics = metrics_address(gateway.settings)
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics.port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert not is_loopback(metrics.host), "Prometheus scrapes the pod's IP"
    declared = {p["containerPort"] for p in gateway.container["ports"]}
    assert metrics.port in declared


def test_declared_ports_are_the_listeners() -> None:
    gateway = k8s_gateway()
    settings = gateway.settings
    # The listeners on the pod's IP, not the loopback-only internal one.
    listeners = {
        address.port
        for address in (settings.listen, settings.internal_listen, metrics_address(settings))
        if not is_loopback(address.host)
    }
    assert listeners == {settings.listen.port, metrics_address(settings).port}
    assert {p["containerPort"] for p in gateway.container["ports"]} == listeners
    template = gateway.deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert gateway.deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = [
        s for s in k8s_objects("Service") if s["spec"]["selector"].items() <= labels.items()
    ]
    for port in service["spec"]["ports"]:
        assert container_port(gateway.container, port["targetPort"]) == settings.listen.port, (
            "the Service must send clients to the public listener, nothing else"
        )


def test_the_store_password_comes_from_the_secret() -> None:
    gateway = k8s_gateway()
    url = urllib.parse.urlsplit(gateway.settings.store)
    # The gateway reads store: from its file only; a password there would sit in a ConfigMap.
    assert url.password is None, "the ConfigMap's store URL carries a password"
    assert "${" not in gateway.settings.store, "the gateway does not expand variables in store:"
    env = {e["name"]: e for e in gateway.container.get("env", [])}
    assert "PGPASSWORD" in env, "asyncpg takes the password from PGPASSWORD"
    ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret_value(ref["name"], ref["key"])


def test_network_policy_opens_the_public_port_and_metrics_to_monitoring() -> None:
    gateway = k8s_gateway()
    labels = gateway.deployment["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in k8s_objects("NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
    ]
    assert policies, "no NetworkPolicy selects the gateway's pods"
    sources: dict[int, list[list[Any]]] = {}  # port -> each rule's `from` ([] = anywhere)
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports"), "a rule without ports opens every port"
            for port in rule["ports"]:
                number = container_port(gateway.container, port["port"])
                sources.setdefault(number, []).append(rule.get("from", []))
    settings = gateway.settings
    public, metrics = settings.listen.port, metrics_address(settings).port
    assert set(sources) == {public, metrics}, f"the policies open {sorted(sources)}"
    assert [] in sources[public], "clients from anywhere reach the public listener"
    # Prometheus only; the kubelet's probes come from the node, which is always let in.
    for peers in sources[metrics]:
        assert peers, "the metrics listener is open to every pod"
        for peer in peers:
            assert "ipBlock" not in peer, peer
            namespace = peer.get("namespaceSelector", {}).get("matchLabels", {})
            assert namespace.get("kubernetes.io/metadata.name") == "monitoring", peer


def test_termination_grace_covers_the_shutdown() -> None:
    gateway = k8s_gateway()
    pause = 0.0
    for container in gateway.pod["containers"]:
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if command and command[0] == "sleep":
            pause += float(command[1])
    grace = gateway.pod.get("terminationGracePeriodSeconds", 30)
    # The app's pause and exit come first, then the gateway's shutdown_grace.
    assert grace >= pause + gateway.settings.shutdown_grace + 5


def test_pod_user_is_the_images_user() -> None:
    gateway = k8s_gateway()
    pod_user = gateway.pod.get("securityContext", {}).get("runAsUser")
    user = gateway.container.get("securityContext", {}).get("runAsUser", pod_user)
    # runAsNonRoot with a named image user fails to start: the kubelet checks numbers only.
    assert user == GATEWAY_DOCKERFILE.uid


def test_demo_postgres_is_the_store_url() -> None:
    gateway = k8s_gateway()
    url = urllib.parse.urlsplit(gateway.settings.store)
    service = k8s_object("Service", str(url.hostname))
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == (url.port or 5432)]
    (database,) = [
        s
        for s in k8s_objects("StatefulSet")
        if s["spec"]["template"]["metadata"]["labels"].items()
        >= service["spec"]["selector"].items()
    ]
    (container,) = database["spec"]["template"]["spec"]["containers"]
    assert container_port(container, port["targetPort"]) == 5432
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_USER"]["value"] == url.username
    assert env["POSTGRES_DB"]["value"] == url.path.lstrip("/")
    gateway_env = {e["name"]: e for e in gateway.container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"] == gateway_env["PGPASSWORD"]["valueFrom"]


def test_app_image_runs_the_example() -> None:
    dockerfile = read_dockerfile(K8S / "trips.Dockerfile")
    copied = dict((dest, source) for source, dest in dockerfile.copies)
    script = dockerfile.entrypoint[-1]
    assert script in copied, f"{script} is not copied into the image"
    assert (REPO / copied[script]).is_file()
    gateway = k8s_gateway()
    (app,) = gateway.pod["containers"]
    assert "command" not in app, "the image's entrypoint runs the example"


async def served(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def loopback_copy(data: dict[str, Any], db: Path) -> tuple[dict[str, Any], dict[int, int]]:
    """The config with its listeners on free loopback ports and an SQLite store; the map from
    each port in the config to the port now used for it."""
    copy = dict(data)
    ports: dict[int, int] = {}
    for key in ("listen", "internal_listen", "metrics_listen"):
        if copy.get(key):
            port = int(copy[key].rsplit(":", 1)[1])
            ports[port] = free_port()
            copy[key] = f"127.0.0.1:{ports[port]}"
    copy["store"] = f"sqlite:///{db}"
    copy.pop("lease", None)  # PostgreSQL only
    return copy, ports


async def test_probe_and_scrape_paths_are_served(tmp_path: Path) -> None:
    """Each probe's and the scrape's path, asked of a gateway running the ConfigMap's config
    (SQLite instead of PostgreSQL, loopback ports), on the port the manifest names."""
    k8s = k8s_gateway()
    data, ports = loopback_copy(k8s.data, tmp_path / "stepgate.db")
    gateway = Gateway(parse_settings(data, source="ConfigMap on loopback"))
    await gateway.start()
    try:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            check = k8s.container[probe]["httpGet"]
            port = ports[container_port(k8s.container, check["port"])]
            status, _ = await served(f"http://127.0.0.1:{port}{check['path']}")
            assert status == 200, f"{probe}: {check['path']} answered {status}"
            # The port the kubelet reaches on the pod's IP keeps the admin API off it.
            status, _ = await served(f"http://127.0.0.1:{port}/v1/runs")
            assert status == 404, f"{probe}'s port serves the admin API ({status})"
        annotations = k8s.deployment["spec"]["template"]["metadata"]["annotations"]
        scrape = f"http://127.0.0.1:{ports[int(annotations['prometheus.io/port'])]}"
        status, text = await served(scrape + annotations["prometheus.io/path"])
        assert status == 200 and "stepgate_requests_total" in text
        if k8s.settings.metrics_listen is not None:  # it keeps the admin API to itself
            status, _ = await served(scrape + "/v1/runs")
            assert status == 404
    finally:
        await gateway.stop()


# --- compose ----------------------------------------------------------------------------------


def test_compose_has_two_gateways_a_database_and_a_balancer() -> None:
    services = compose()["services"]
    gateways = compose_gateways()
    assert len(gateways) == 2, [g.name for g in gateways]
    databases = [n for n, s in services.items() if image_name(s.get("image", "")) == "postgres"]
    assert len(databases) == 1, databases
    lb_service()
    for gateway in gateways:
        assert gateway.settings.postgres, f"{gateway.name}: {gateway.settings.store}"
        assert gateway.settings.routes


def test_compose_gateways_share_one_postgres() -> None:
    services = compose()["services"]
    stores = set()
    for gateway in compose_gateways():
        url = urllib.parse.urlsplit(gateway.settings.store)
        assert url.password is None, f"{gateway.name}: the password belongs in PGPASSWORD"
        database = services[str(url.hostname)]
        assert image_name(database["image"]) == "postgres"
        assert (url.port or 5432) == 5432  # where the postgres image listens
        db_env = environment(database)
        assert db_env["POSTGRES_USER"] == url.username
        assert db_env["POSTGRES_DB"] == url.path.lstrip("/")
        assert environment(gateway.service)["PGPASSWORD"] == db_env["POSTGRES_PASSWORD"]
        assert interpolate(db_env["POSTGRES_PASSWORD"]), "an empty password"
        depends = gateway.service["depends_on"][url.hostname]
        assert depends["condition"] == "service_healthy"
        stores.add(gateway.settings.store)
    assert len(stores) == 1, stores


def test_compose_gateway_configs_differ_only_in_replica_id() -> None:
    first, second = compose_gateways()
    assert first.settings.replica_id and second.settings.replica_id
    assert first.settings.replica_id != second.settings.replica_id
    assert {**first.data, "replica_id": None} == {**second.data, "replica_id": None}


def test_each_app_shares_its_gateways_network() -> None:
    for gateway in compose_gateways():
        apps = apps_of(gateway.name)
        assert len(apps) == 1, f"{gateway.name} fronts {len(apps)} apps"
        name, app = apps[0]
        entrypoint = app["entrypoint"]
        host, port = option(entrypoint, "--host"), option(entrypoint, "--port")
        assert host and port and is_loopback(host), entrypoint
        script = next(arg for arg in entrypoint if arg.endswith(".py"))
        assert host_file(app, script).is_file(), f"{name}: {script} is not mounted"
        for route in gateway.settings.routes:
            route_host, route_port = url_address(route.upstream)
            assert is_loopback(route_host) and route_port == int(port), (
                f"{gateway.name} route {route.name}: {route.upstream}, {name} on {host}:{port}"
            )
        internal_host, internal_port = url_address(gateway.settings.internal_url)
        assert is_loopback(internal_host)
        assert internal_port == gateway.settings.internal_listen.port
        health = " ".join(app["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in health, f"{name}'s health check: {health}"


def test_compose_gateway_health_checks_ask_the_internal_listener() -> None:
    for gateway in compose_gateways():
        test = " ".join(gateway.service["healthcheck"]["test"])
        found = re.search(r"http://([^/:'\"]+):([0-9]+)(/[A-Za-z]+)", test)
        assert found, test
        host, port, path = found.groups()
        internal = gateway.settings.internal_listen
        assert (host, int(port)) == (internal.host, internal.port), test
        assert path in ("/healthz", "/readyz")


def upstream_servers(site: Directive, name: str) -> list[str]:
    (upstream,) = [d for d in site.find("upstream") if d.args == [name]]
    return [d.args[0] for d in upstream.find("server")]


def test_nginx_balances_both_gateways() -> None:
    path, site = nginx_site()
    (server,) = site.find("server")
    passes = [d for d in server.walk() if d.name == "proxy_pass"]
    assert passes, f"{path}: no proxy_pass"
    gateways = compose_gateways()
    expected = {f"{g.name}:{g.settings.listen.port}" for g in gateways}
    for proxy_pass in passes:
        upstream = urllib.parse.urlsplit(proxy_pass.args[0]).netloc
        assert sorted(upstream_servers(site, upstream)) == sorted(expected)
    lb_name, lb = lb_service()
    (listen,) = server.find("listen")
    published = {str(port).rsplit(":", 1)[-1] for port in lb["ports"]}
    assert listen.args[0].rsplit(":", 1)[-1] in published
    for gateway in gateways:
        assert gateway.name in lb["depends_on"], f"{lb_name} starts before {gateway.name}"


def test_nginx_limits_fit_the_gateways() -> None:
    _, site = nginx_site()
    directives = {d.name: d.args for d in site.walk()}
    gateways = [g.settings for g in compose_gateways()]
    routes = [route for settings in gateways for route in settings.routes]
    longest = max([60.0, *(max(r.timeout, r.hold) for r in routes)])  # 60s: a poll's longest
    assert nginx_seconds(directives.get("proxy_read_timeout", ["60s"])[0]) > longest
    idle = min(s.limits.idle_timeout for s in gateways)
    assert nginx_seconds(directives.get("keepalive_timeout", ["60s"])[0]) < idle
    body = max(r.max_body for r in routes if r.durable)
    assert nginx_bytes(directives.get("client_max_body_size", ["1m"])[0]) > body


def test_compose_mounts_and_builds_exist() -> None:
    for name, service in compose()["services"].items():
        for mount in mounts(service):
            if mount.host is not None:
                assert mount.host.exists(), f"{name}: {mount.source} does not exist"
        build = service.get("build")
        if build:
            context = COMPOSE / (build if isinstance(build, str) else build["context"])
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert (context / dockerfile).is_file(), f"{name}: no {context / dockerfile}"
            assert context.resolve() == REPO


def test_readme_names_only_files_that_exist() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([A-Za-z0-9_./-]+\.(?:yaml|conf|Dockerfile|py|md))`", text))
    assert named
    for name in named - {n for n in named if n.startswith("/")}:  # paths in a container
        candidates = [REPO / name, DEPLOY / name, K8S / name, COMPOSE / name]
        assert any(c.is_file() for c in candidates), f"deploy/README.md names {name}"
