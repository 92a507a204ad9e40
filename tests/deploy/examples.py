"""Reading the deployment examples in deploy/: Kubernetes manifests, the compose file, the gateway
configs they carry or mount, nginx's config and the Dockerfiles, as the tests need them."""

from __future__ import annotations

import base64
import os
import posixpath
import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Settings, parse_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE / "compose.yaml"
GATEWAY_IMAGE = "stepgate"  # the repository name the examples give the root Dockerfile's image

Doc = dict[str, Any]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_name(image: str) -> str:
    """``registry/stepgate:0.1.0`` -> ``stepgate``."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def option(args: list[str], name: str) -> str | None:
    """The value after ``name`` in an argument list (``--config FILE`` or ``--config=FILE``)."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# --- the root Dockerfile (the gateway's image) ------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    entrypoint: list[str]
    cmd: list[str]
    uid: int | None
    copies: list[tuple[str, str]]  # (source, destination) of each COPY


def read_dockerfile(path: Path) -> Dockerfile:
    entrypoint: list[str] = []
    cmd: list[str] = []
    uid = None
    copies: list[tuple[str, str]] = []
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        word, _, rest = line.partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = yaml.safe_load(rest)
        elif word == "CMD":
            cmd = yaml.safe_load(rest)
        elif word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            copies += [(source, parts[-1]) for source in parts[:-1]]
        found = re.search(r"useradd\b.*--uid\s+([0-9]+)", line)
        if found:
            uid = int(found.group(1))
    return Dockerfile(entrypoint, cmd, uid, copies)


GATEWAY_DOCKERFILE = read_dockerfile(REPO / "Dockerfile")


# --- Kubernetes -------------------------------------------------------------------------------


def k8s_documents() -> list[tuple[Path, Doc]]:
    """Every object in deploy/kubernetes/*.yaml, with the file it came from."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        with path.open(encoding="utf-8") as file:
            for doc in yaml.safe_load_all(file):
                if doc is not None:
                    found.append((path, doc))
    return found


def k8s_objects(kind: str) -> list[Doc]:
    return [doc for _, doc in k8s_documents() if doc.get("kind") == kind]


def k8s_object(kind: str, name: str) -> Doc:
    matches = [doc for doc in k8s_objects(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, (
        f"expected one {kind} {name!r} in deploy/kubernetes, found {len(matches)}"
    )
    return matches[0]


def secret_value(name: str, key: str) -> str:
    secret = k8s_object("Secret", name)
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    assert key in secret.get("data", {}), f"Secret {name} has no key {key}"
    return base64.b64decode(secret["data"][key]).decode()


def pod_containers(pod_spec: Doc) -> list[tuple[str, Doc]]:
    """("initContainers" | "containers", container) for every container of a pod."""
    return [
        (group, container)
        for group in ("initContainers", "containers")
        for container in pod_spec.get(group, [])
    ]


def gateway_container(pod_spec: Doc) -> tuple[str, Doc]:
    """The one container running the gateway's image, and the list it is in."""
    found = [
        (group, c)
        for group, c in pod_containers(pod_spec)
        if image_name(c["image"]) == GATEWAY_IMAGE
    ]
    assert len(found) == 1, f"expected one container of the {GATEWAY_IMAGE} image, found {found}"
    return found[0]


def container_port(container: Doc, port: int | str) -> int:
    """A probe's or a Service's port (a number or a port name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"container {container['name']} has no port named {port!r}"
    return int(named[port])


def config_path(command: list[str] | None, args: list[str] | None) -> str:
    """The --config file a gateway container runs with, its image's entrypoint and cmd taken
    into account (a container's command replaces the entrypoint, args replace the cmd)."""
    entrypoint = command if command is not None else GATEWAY_DOCKERFILE.entrypoint
    arguments = args if args is not None else (GATEWAY_DOCKERFILE.cmd if command is None else [])
    full = [*entrypoint, *arguments]
    assert full[:2] == ["stepgate", "serve"], f"the container does not run stepgate serve: {full}"
    path = option(full[2:], "--config")
    assert path, f"stepgate serve without --config: {full}"
    return path


def configmap_file(pod_spec: Doc, container: Doc, path: str) -> tuple[Doc, str]:
    """The ConfigMap and key that a file in a container comes from."""
    for mount in container.get("volumeMounts", []):
        mount_path = mount["mountPath"].rstrip("/")
        if "subPath" in mount:
            if path != mount_path:
                continue
            relative = mount["subPath"]
        elif path.startswith(mount_path + "/"):
            relative = path[len(mount_path) + 1 :]
        else:
            continue
        volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
        assert "configMap" in volume, f"{path} is mounted from {volume}, not from a ConfigMap"
        source = volume["configMap"]
        key = relative
        for item in source.get("items", []):
            if item["path"] == relative:
                key = item["key"]
                break
        else:
            assert not source.get("items"), f"{relative} is not among the ConfigMap's items"
        return k8s_object("ConfigMap", source["name"]), key
    raise AssertionError(f"no volume of container {container['name']} holds {path}")


@dataclass(frozen=True)
class K8sGateway:
    deployment: Doc
    pod: Doc  # the pod template's spec
    group: str  # where the gateway container is: initContainers or containers
    container: Doc
    configmap: Doc
    key: str
    data: Any  # the config as YAML data
    settings: Settings


def k8s_gateway() -> K8sGateway:
    deployments = k8s_objects("Deployment")
    assert len(deployments) == 1, "deploy/kubernetes should hold one Deployment"
    deployment = deployments[0]
    pod = deployment["spec"]["template"]["spec"]
    group, container = gateway_container(pod)
    path = config_path(container.get("command"), container.get("args"))
    configmap, key = configmap_file(pod, container, path)
    name = configmap["metadata"]["name"]
    assert key in configmap.get("data", {}), f"ConfigMap {name} has no {key}"
    data = yaml.safe_load(configmap["data"][key])
    source = f"deploy/kubernetes ConfigMap {name}: {key}"
    settings = parse_settings(data, source=source, read_key=False)
    return K8sGateway(deployment, pod, group, container, configmap, key, data, settings)


# --- compose ----------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default}, with this process's environment."""
    return _INTERPOLATION.sub(lambda m: os.environ.get(m["name"]) or (m["default"] or ""), value)


def compose() -> Doc:
    with COMPOSE_FILE.open(encoding="utf-8") as file:
        data: Doc = yaml.safe_load(file)
    return data


def environment(service: Doc) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str  # as written
    target: str
    host: Path | None  # a bind mount's file or folder; None for a named volume


def mounts(service: Doc) -> list[Mount]:
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = volume.split(":")[:2]
        bind = source.startswith((".", "/"))
        found.append(Mount(source, target, (COMPOSE / source).resolve() if bind else None))
    return found


def host_file(service: Doc, container_path: str) -> Path:
    """The file on the host that a bind mount puts at ``container_path``."""
    for mount in mounts(service):
        if mount.host is None:
            continue
        if container_path == mount.target:
            return mount.host
        if container_path.startswith(mount.target.rstrip("/") + "/"):
            return mount.host / posixpath.relpath(container_path, mount.target)
    raise AssertionError(f"no bind mount puts anything at {container_path}")


def is_gateway_service(service: Doc) -> bool:
    return image_name(service.get("image", "")) == GATEWAY_IMAGE and "entrypoint" not in service


@dataclass(frozen=True)
class ComposeGateway:
    name: str
    service: Doc
    config_file: Path
    data: Any
    settings: Settings


def compose_gateways() -> list[ComposeGateway]:
    services = compose()["services"]
    found = []
    for name, service in services.items():
        if not is_gateway_service(service):
            continue
        command = service.get("command")
        path = config_path(None, command)
        config_file = host_file(service, path)
        assert config_file.is_file(), f"{name}: {config_file} does not exist"
        data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        settings = parse_settings(data, source=str(config_file.relative_to(REPO)), read_key=False)
        found.append(ComposeGateway(name, service, config_file, data, settings))
    return found


def apps_of(gateway: str) -> list[tuple[str, Doc]]:
    return [
        (name, service)
        for name, service in compose()["services"].items()
        if service.get("network_mode") == f"service:{gateway}"
    ]


# --- nginx ------------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in (self.block or []) if d.name == name]

    def walk(self) -> list[Directive]:
        found = []
        for child in self.block or []:
            found.append(child)
            found += child.walk()
        return found


_NGINX_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|#[^\n]*|[{};]|[^\s{};"\'#]+')


def parse_nginx(text: str) -> Directive:
    """nginx's config syntax: directives ending in ";" or carrying a {block}."""
    tokens = [t for t in _NGINX_TOKEN.findall(text) if not t.startswith("#")]
    position = 0

    def block() -> list[Directive]:
        nonlocal position
        directives: list[Directive] = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == ";":
                directives.append(Directive(words[0], words[1:]))
                words = []
            elif token == "{":
                directives.append(Directive(words[0], words[1:], block()))
                words = []
            elif token == "}":
                assert not words, f"unterminated directive {words}"
                return directives
            else:
                words.append(token[1:-1] if token[0] in "\"'" else token)
        assert not words, f"unterminated directive {words}"
        return directives

    return Directive("main", [], block())


def nginx_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    found = re.fullmatch(r"([0-9]+)(ms|s|m|h|d)?", text)
    assert found, f"not an nginx time: {text}"
    return int(found.group(1)) * units[found.group(2) or "s"]


def nginx_bytes(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    found = re.fullmatch(r"([0-9]+)([kKmMgG]?)", text)
    assert found, f"not an nginx size: {text}"
    return int(found.group(1)) * units[found.group(2).lower()]


def lb_service() -> tuple[str, Doc]:
    found = [
        (name, s)
        for name, s in compose()["services"].items()
        if image_name(s.get("image", "")) == "nginx"
    ]
    assert len(found) == 1, f"expected one nginx service in compose.yaml, found {len(found)}"
    return found[0]


NGINX_SITE = "/etc/nginx/conf.d/default.conf"  # what the nginx image includes in its http {}


def nginx_site() -> tuple[Path, Directive]:
    _, service = lb_service()
    path = host_file(service, NGINX_SITE)
    return path, parse_nginx(path.read_text(encoding="utf-8"))
