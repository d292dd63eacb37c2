"""The deployment files agree with the code they deploy.

No Docker engine or cluster runs in the tests, so this checks what can drift silently: probe and
metrics paths are routes of the app, every variable the files set is one the server reads, the
manifests' settings pass the server's own validation, the grace period outlasts the drain, the
image runs as the user the pods require, the personas in the ConfigMap load (from the layout a
ConfigMap volume really has), and the Procfile and image commands parse with the CLI. The two
modes: the Deployment shares PostgreSQL through the Secret and keeps no volume, the StatefulSet
keeps SQLite on a claim per pod, and the README's database set-up really lets phoneagent create
its tables (on the tests' PostgreSQL). The local compose file: two instances of the image with one
database and distinct host names, health-gated start-up, and an nginx that balances them round
robin and passes WebSocket upgrades (its configuration read with a small nginx-syntax reader).

The manifests and the compose file are read with a small YAML-subset reader (stdlib only: PyYAML
is not a project dependency). It refuses what it does not understand rather than guess; where
PyYAML happens to be installed, a test checks the reader agrees with it.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import EXAMPLE_PERSONAS, PROJECT_ROOT, VALID_ENV

from phoneagent.cli import build_parser, cmd_serve
from phoneagent.config import CREDENTIALS, Settings, load_settings
from phoneagent.personas import PersonaRegistry, load_directory
from phoneagent.server import create_app, create_metrics_app
from phoneagent.state import STATE

INFRA = PROJECT_ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
WORKLOADS = ["deployment.yaml", "statefulset.yaml"]
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"


# --- a YAML-subset reader -----------------------------------------------------------------------

_KEY = re.compile(r"^([A-Za-z0-9_./-]+):(?:\s+(.*))?$")
_INT = re.compile(r"^-?\d+$")


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    if text.startswith("[") or text.startswith('"'):
        return json.loads(text)  # flow sequences and quoted strings: JSON-compatible only
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    if text == "{}":
        return {}
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if _INT.match(text):
        return int(text)
    if text[0] in "{&*!|>%@`":
        raise ValueError(f"unsupported YAML: {text!r}")
    return text


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def peek(self) -> tuple[int, str] | None:
        """(indent, content) of the next line with content, comments removed."""
        while self.i < len(self.lines):
            line = _strip_comment(self.lines[self.i])
            if line.strip() == "---" and self.i > 0:
                raise ValueError("one YAML document per file")
            if line.strip() and line.strip() != "---":
                return len(line) - len(line.lstrip(" ")), line.strip()
            self.i += 1
        return None

    def block(self, indent: int) -> Any:
        nxt = self.peek()
        if nxt is None or nxt[0] < indent:
            return None
        if nxt[1] == "-" or nxt[1].startswith("- "):
            return self.sequence(nxt[0])
        if not _KEY.match(nxt[1]):  # a plain scalar on its own line: a sequence item
            self.i += 1
            return _scalar(nxt[1])
        return self.mapping(nxt[0])

    def mapping(self, indent: int) -> dict:
        result: dict[str, Any] = {}
        while (nxt := self.peek()) and nxt[0] == indent and not nxt[1].startswith("-"):
            match = _KEY.match(nxt[1])
            if not match:
                raise ValueError(f"line {self.i + 1}: not a `key: value`: {nxt[1]!r}")
            key, value = match.groups()
            self.i += 1
            if value == "|":
                result[key] = self.literal(indent)
            elif value:
                result[key] = _scalar(value)
            elif (after := self.peek()) and after[0] == indent and after[1].startswith("-"):
                result[key] = self.sequence(indent)  # a sequence may sit at its key's indent
            else:
                result[key] = self.block(indent + 1)
        if nxt and nxt[0] > indent:
            raise ValueError(f"line {self.i + 1}: unexpected indentation")
        return result

    def sequence(self, indent: int) -> list:
        items = []
        while (nxt := self.peek()) and nxt[0] == indent and nxt[1].startswith("-"):
            line = self.lines[self.i]
            dash = line.index("-")
            # The item's content starts after "- ": read it as if the dash were a space.
            self.lines[self.i] = line[:dash] + " " + line[dash + 1 :]
            items.append(self.block(indent + 1))
        return items

    def literal(self, indent: int) -> str:
        """A `|` block scalar, clipped (one final newline), comments kept as text."""
        lines: list[str] = []
        block_indent = None
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip():
                width = len(line) - len(line.lstrip(" "))
                if width <= indent:
                    break
                block_indent = block_indent if block_indent is not None else width
                lines.append(line[block_indent:])
            else:
                lines.append("")
            self.i += 1
        while lines and not lines[-1]:
            lines.pop()
        return "\n".join(lines) + "\n"


def read_yaml(path: Path) -> Any:
    reader = _Reader(path.read_text())
    document = reader.block(0)
    if reader.peek() is not None:
        raise ValueError(f"{path}: line {reader.i + 1} was not understood")
    return document


@pytest.fixture(scope="module")
def manifests() -> dict[str, Any]:
    return {name: read_yaml(K8S / name) for name in MANIFESTS}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return read_yaml(COMPOSE)


def test_the_reader_agrees_with_pyyaml(manifests, compose):
    yaml = pytest.importorskip("yaml")
    for name, document in manifests.items():
        assert document == yaml.safe_load((K8S / name).read_text()), name
    assert compose == yaml.safe_load(COMPOSE.read_text())


# --- what the files declare -----------------------------------------------------------------


def container(workload: dict) -> dict:
    [main] = workload["spec"]["template"]["spec"]["containers"]
    return main


def plain_env(workload: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(workload)["env"] if "value" in e}


def secret_env(workload: dict) -> dict[str, dict]:
    """The variables a workload takes from a Secret by key: name -> its ``secretKeyRef``."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(workload)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def pod_settings(workload: dict, secrets: dict[str, str]) -> Settings:
    """What the pod's server reads: the image's environment, the workload's, and the values of
    its secret keys (from the example Secret), with well-formed credentials."""
    from_secret = {name: secrets[ref["key"]] for name, ref in secret_env(workload).items()}
    return load_settings(VALID_ENV | dockerfile_env() | plain_env(workload) | from_secret)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, args in final_stage():
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def settings_read() -> set[str]:
    """The environment variables ``load_settings`` looks at."""

    class Recording(dict):
        def __init__(self, values: dict[str, str]) -> None:
            super().__init__(values)
            self.seen: set[str] = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

    env = Recording(VALID_ENV)
    load_settings(env)
    return env.seen


# Read by the graceful-drain work (issue 8), in progress as these files land; harmless once
# `load_settings` reads them.
PENDING_SETTINGS = {"PHONEAGENT_DRAIN_SECONDS", "PHONEAGENT_MAX_CALLS"}


def configmap_personas(manifests, directory: Path) -> list:
    """Write the ConfigMap's files into ``directory`` and load them, with the example secret's
    keys as the environment (a persona's webhook secret must be one of them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in manifests["configmap-personas.yaml"]["data"].items():
        (directory / name).write_text(text)
    secrets = manifests["secret.example.yaml"]["stringData"]
    return list(load_directory(directory, environ=secrets).personas.values())


@pytest.fixture(scope="module")
def deployed_personas(manifests, tmp_path_factory) -> list:
    return configmap_personas(manifests, tmp_path_factory.mktemp("configmap") / "personas")


def app_routes() -> set[tuple[str, str]]:
    """The routes of the port Twilio reaches."""
    settings = load_settings(VALID_ENV)
    app = create_app(settings, PersonaRegistry(EXAMPLE_PERSONAS, environ={}))
    return {(route.method, route.resource.canonical) for route in app.router.routes()}


def metrics_routes() -> set[tuple[str, str]]:
    """The routes of the metrics listener."""
    settings = load_settings(VALID_ENV)
    app = create_app(settings, PersonaRegistry(EXAMPLE_PERSONAS, environ={}))
    metrics = create_metrics_app(app[STATE])
    return {(route.method, route.resource.canonical) for route in metrics.router.routes()}


def container_ports(workload: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(workload)["ports"]}


# --- the image --------------------------------------------------------------------------------


def test_image_is_slim_python_and_runs_as_a_numeric_non_root_user():
    stage = final_stage()
    assert stage[0][1].split()[0] in ("python:3.12-slim", "${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.12-slim" in DOCKERFILE.read_text()
    [user] = [args for word, args in stage if word == "USER"]
    uid = user.split(":")[0]
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it and refuses to start the pod.
    assert uid.isdigit() and int(uid) != 0


def test_image_installs_the_package_without_test_tools():
    runs = " ".join(args for word, args in dockerfile_instructions() if word == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs)
    assert "[test]" not in runs and "pytest" not in runs and "-e " not in runs


def test_image_settings_are_ones_the_server_reads_and_agree_with_its_ports():
    env = dockerfile_env()
    assert set(env) - {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"} <= settings_read()
    [exposed] = [args.split() for word, args in final_stage() if word == "EXPOSE"]
    assert exposed == [env["PORT"], env["PHONEAGENT_METRICS_PORT"]]
    settings = load_settings(VALID_ENV | env)
    assert (settings.port, settings.metrics_port) == (Settings.port, Settings.metrics_port)
    # Inside a container, loopback would be unreachable from outside it, published or not.
    assert settings.metrics_host == "0.0.0.0"
    [volume] = [json.loads(args) for word, args in final_stage() if word == "VOLUME"]
    assert volume == [env["PHONEAGENT_DATA_DIR"]]
    assert ("STOPSIGNAL", "SIGTERM") in final_stage()


def test_image_command_and_procfile_parse_with_the_cli():
    stage = dict(final_stage())
    command = json.loads(stage["ENTRYPOINT"]) + json.loads(stage["CMD"])
    assert command[0] == "phoneagent"
    args = build_parser().parse_args(command[1:])
    assert args.handler is cmd_serve and args.host == "0.0.0.0"

    [procfile] = (PROJECT_ROOT / "Procfile").read_text().splitlines()
    kind, _, line = procfile.partition(":")
    assert kind == "web"
    argv = shlex.split(line.replace("$PORT", "5000"))
    assert argv[0] == "phoneagent"
    args = build_parser().parse_args(argv[1:])
    assert args.handler is cmd_serve and args.port == 5000 and args.host == "0.0.0.0"


def test_image_healthcheck_probes_a_route():
    [check] = [args for word, args in final_stage() if word == "HEALTHCHECK"]
    [path] = re.findall(r"(/\w+)'", check)
    assert ("GET", path) in app_routes()


def test_build_context_lets_in_what_the_dockerfile_copies():
    allowed = [
        line[1:].rstrip("/")
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied = [
        source
        for word, args in dockerfile_instructions()
        if word == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert copied and all(source.rstrip("/") in allowed for source in copied), (copied, allowed)
    # `pip install .` reads the readme named in pyproject.toml: it must be in the context.
    assert "README.md" in allowed


# --- the workloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_probes_and_metrics_point_at_routes_of_the_app(manifests, name):
    routes = app_routes()
    main = container(manifests[name])
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ("GET", main[probe]["httpGet"]["path"]) in routes
        assert main[probe]["httpGet"]["port"] == main["ports"][0]["name"]
    annotations = manifests[name]["spec"]["template"]["metadata"]["annotations"]
    # Prometheus scrapes the metrics listener, which serves the path; the public port does not.
    assert ("GET", annotations["prometheus.io/path"]) in metrics_routes()
    assert ("GET", annotations["prometheus.io/path"]) not in routes
    ports = container_ports(manifests[name])
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] != ports["http"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_environment_is_what_the_server_reads_and_passes_its_validation(
    manifests, deployed_personas, name
):
    main = container(manifests[name])
    names = [e["name"] for e in main["env"]]
    secret = manifests["secret.example.yaml"]
    secrets = secret["stringData"]
    known = settings_read() | PENDING_SETTINGS
    assert set(names) <= known, set(names) - known
    assert len(names) == len(set(names))  # each set once: a later entry would win silently
    # A key read by name must be in the Secret (else the pod does not start) and is required.
    for ref in secret_env(manifests[name]).values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secrets
        assert not ref.get("optional", False)
    # The other keys reach the pods as variables of the same name (envFrom): real settings, or
    # a persona's webhook secret.
    by_key = {ref["key"] for w in WORKLOADS for ref in secret_env(manifests[w]).values()}
    webhook_secrets = {p.webhook.secret_env for p in deployed_personas if p.webhook}
    assert set(secrets) - by_key <= known | webhook_secrets, set(secrets) - by_key - known
    # Every credential comes from somewhere: the pod's env or the secret.
    assert set(CREDENTIALS) <= set(names) | set(secrets)
    [source] = main["envFrom"]
    assert source["secretRef"]["name"] == secret["metadata"]["name"]
    # The manifest's values, with well-formed credentials, are a valid configuration.
    settings = pod_settings(manifests[name], secrets)
    ports = container_ports(manifests[name])
    assert (settings.port, settings.metrics_port) == (ports["http"], ports["metrics"])
    assert settings.metrics_host == "0.0.0.0"  # the pod's address: Prometheus is another pod
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert Path(mounts["personas"]) == settings.personas_dir


def test_the_deployment_shares_postgresql_from_the_secret_and_keeps_no_volume(manifests):
    deployment = manifests["deployment.yaml"]
    secret = manifests["secret.example.yaml"]
    # The database URL holds a password: from the Secret, by key, never a value in the manifest.
    assert "PHONEAGENT_DATABASE_URL" not in plain_env(deployment)
    ref = secret_env(deployment)["PHONEAGENT_DATABASE_URL"]
    assert ref == {"name": secret["metadata"]["name"], "key": "database-url"}
    url = secret["stringData"]["database-url"]
    settings = pod_settings(deployment, secret["stringData"])
    assert settings.database_url == url  # and it passed the server's validation
    assert url.startswith("postgresql://") and "sslmode=require" in url
    # Nothing per pod to keep: no claim, and nothing mounted where a SQLite outbox would go, on
    # a read-only root filesystem (a pod without the URL fails at start-up, loudly).
    pod = deployment["spec"]["template"]["spec"]
    assert "volumeClaimTemplates" not in deployment["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v or "ephemeral" in v]
    mounted = [Path(m["mountPath"]) for m in container(deployment)["volumeMounts"]]
    data_dir = settings.data_dir
    assert not [
        m for m in mounted if m == data_dir or m in data_dir.parents or data_dir in m.parents
    ]
    assert container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_statefulset_is_the_sqlite_mode_with_a_volume_per_pod(manifests):
    statefulset = manifests["statefulset.yaml"]
    secrets = manifests["secret.example.yaml"]["stringData"]
    # No database: neither set here nor reaching the pods through envFrom under its own name.
    names = {e["name"] for e in container(statefulset)["env"]}
    assert "PHONEAGENT_DATABASE_URL" not in names | set(secrets)
    settings = pod_settings(statefulset, secrets)
    assert settings.database_url == ""
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    assert Path(mounts[claim["metadata"]["name"]]) == settings.data_dir


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_terminating_pod_gets_to_finish_its_calls(manifests, deployed_personas, name):
    pod = manifests[name]["spec"]["template"]["spec"]
    env = plain_env(manifests[name])
    drain = int(env.get("PHONEAGENT_DRAIN_SECONDS", getattr(Settings, "drain_seconds", 600)))
    command = container(manifests[name])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    # The grace period counts from the start of preStop; the margin covers closing sockets and
    # the outbox's last flush after the drain.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 30
    # A rollout must never cut a call: the drain outlasts the longest call a persona allows.
    assert drain >= max(p.max_call_seconds for p in deployed_personas)


@pytest.mark.parametrize("name", WORKLOADS)
def test_pods_run_as_the_images_user_and_hpa_owns_the_replicas(manifests, name):
    spec = manifests[name]["spec"]
    pod = spec["template"]["spec"]
    [user] = [args for word, args in final_stage() if word == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert "replicas" not in spec  # the HPA sets it; a value here resets it on each apply
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_a_rollout_surges_and_never_lowers_capacity(manifests):
    rolling = manifests["deployment.yaml"]["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    assert rolling["maxSurge"] not in (0, "0%")


def test_service_pdb_and_hpa_select_the_workload(manifests):
    deployment = manifests["deployment.yaml"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert manifests["service.yaml"]["spec"]["selector"].items() <= labels.items()
    assert manifests["pdb.yaml"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = manifests["hpa.yaml"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The Service is what the Ingress, and so Twilio, reaches: never the metrics port.
    service_ports = manifests["service.yaml"]["spec"]["ports"]
    assert [port["targetPort"] for port in service_ports] == ["http"]
    metrics_port = container_ports(deployment)["metrics"]
    assert all(port["port"] not in ("metrics", metrics_port) for port in service_ports)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    personas = manifests["configmap-personas.yaml"]["metadata"]["name"]
    assert volumes["personas"]["configMap"]["name"] == personas


async def test_hpa_scales_on_a_gauge_the_server_exports_below_its_call_cap(
    manifests, aiohttp_client
):
    [calls] = [m["pods"] for m in manifests["hpa.yaml"]["spec"]["metrics"] if m["type"] == "Pods"]
    name = calls["metric"]["name"]
    app = create_app(load_settings(VALID_ENV), PersonaRegistry(EXAMPLE_PERSONAS, environ={}))
    client = await aiohttp_client(create_metrics_app(app[STATE]))
    response = await client.get("/metrics")
    assert response.status == 200
    assert re.search(rf"^# TYPE {name} gauge$", await response.text(), re.MULTILINE)
    cap = int(plain_env(manifests["deployment.yaml"]).get("PHONEAGENT_MAX_CALLS", 100))
    assert int(calls["target"]["averageValue"]) < cap


# --- configuration objects ----------------------------------------------------------------------


def test_configmap_personas_are_a_valid_set(deployed_personas):
    assert {p.id for p in deployed_personas} == {p.stem for p in EXAMPLE_PERSONAS.glob("*.toml")}


def test_personas_load_from_the_layout_of_a_configmap_volume(manifests, tmp_path):
    # The kubelet writes the files into a timestamped directory, points `..data` at it and
    # links each key to `..data/<key>`; an update swaps `..data` in one rename.
    volume = tmp_path / "personas"
    configmap_personas(manifests, volume / "..2026_01_01_00_00_00.000000001")
    (volume / "..data").symlink_to("..2026_01_01_00_00_00.000000001")
    for name in manifests["configmap-personas.yaml"]["data"]:
        (volume / name).symlink_to(Path("..data") / name)
    secrets = manifests["secret.example.yaml"]["stringData"]
    registry = PersonaRegistry(volume, environ=secrets)
    assert set(registry.current.personas) == {p.stem for p in EXAMPLE_PERSONAS.glob("*.toml")}


def test_kustomization_lists_every_manifest_but_the_secret_example(manifests):
    resources = set(manifests["kustomization.yaml"]["resources"])
    assert resources <= set(MANIFESTS)
    # The example secret holds placeholders: applying it would overwrite the real one.
    assert "secret.example.yaml" not in resources
    # One workload or the other, never both.
    assert len(resources & set(WORKLOADS)) == 1
    assert set(MANIFESTS) - resources == {
        "kustomization.yaml",
        "secret.example.yaml",
        *(set(WORKLOADS) - resources),
    }


# --- trying it locally: compose.yaml and its nginx --------------------------------------------

# Compose's interpolation (compose-spec, "Interpolation"): ${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?error}, ${VAR?error}.
_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolated(value: Any, environ: Mapping[str, str]) -> str:
    """``value`` as Compose would pass it, with ``environ`` as the shell and .env."""

    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"]
        given = environ.get(name)
        missing = given is None if op in ("-", "?") else not given
        if missing and op.endswith("-"):
            return arg
        if missing and op.endswith("?"):
            raise LookupError(f"{name} is required: {arg}")
        return given or ""

    text = str(value)
    result = _INTERPOLATION.sub(one, text)
    assert "$" not in result, text  # $$, an unbraced $VAR or a malformed ${…}: not expected here
    return result


def compose_variables(document: Any) -> dict[str, set[str]]:
    """Every variable the compose file interpolates, with the operators it is used with."""
    found: dict[str, set[str]] = {}
    if isinstance(document, dict):
        document = list(document.values())
    if isinstance(document, list):
        for item in document:
            for name, ops in compose_variables(item).items():
                found.setdefault(name, set()).update(ops)
    elif isinstance(document, str):
        for match in _INTERPOLATION.finditer(document):
            found.setdefault(match["name"], set()).add(match["op"] or "")
    return found


def phoneagent_services(compose: dict) -> dict[str, dict]:
    """The services built from infra/Dockerfile (paths relative to the compose file)."""

    def built_from_the_image(service: dict) -> bool:
        build = service.get("build")
        return (
            isinstance(build, dict)
            and (INFRA / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        )

    return {name: s for name, s in compose["services"].items() if built_from_the_image(s)}


# What a filled-in infra/.env holds: the credentials (PUBLIC_URL has a default in the file).
DOTENV = {name: value for name, value in VALID_ENV.items() if name != "PUBLIC_URL"}


def instance_env(service: dict, environ: Mapping[str, str] = DOTENV) -> dict[str, str]:
    assert isinstance(service["environment"], dict)  # the mapping form, not KEY=value lines
    return {name: interpolated(value, environ) for name, value in service["environment"].items()}


def instance_settings(service: dict) -> Settings:
    """What the instance's server reads: the image's environment and the service's."""
    return load_settings(dockerfile_env() | instance_env(service))


def seconds(duration: str) -> float:
    """A Compose or nginx duration: ``90s``, ``1m30s``, ``3600s``, ``15`` (nginx: seconds)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    if duration.isdigit():
        return float(duration)
    parts = re.findall(r"(\d+)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def service_by_image(compose: dict, prefix: str) -> tuple[str, dict]:
    [found] = [
        (n, s) for n, s in compose["services"].items() if s.get("image", "").startswith(prefix)
    ]
    return found


def test_compose_runs_two_instances_of_the_image_on_one_postgresql(compose):
    instances = phoneagent_services(compose)
    assert len(instances) == 2, list(compose["services"])
    first, second = instances.values()
    assert first["environment"] == second["environment"]  # same settings, same database
    postgres_name, postgres = service_by_image(compose, "postgres:")
    assert postgres["image"] == "postgres:15"  # the version the tests run
    for service in instances.values():
        assert service["depends_on"][postgres_name] == {"condition": "service_healthy"}
    for environ in (DOTENV, DOTENV | {"POSTGRES_PASSWORD": "a-password-of-ones-own"}):
        database = {k: interpolated(v, environ) for k, v in postgres["environment"].items()}
        url = urlsplit(instance_env(first, environ)["PHONEAGENT_DATABASE_URL"])
        assert url.scheme == "postgresql"
        assert (url.hostname, url.port) == (postgres_name, 5432)  # the service's name and port
        assert (url.username, url.password) == (
            database["POSTGRES_USER"],
            database["POSTGRES_PASSWORD"],
        )
        assert url.path == "/" + database["POSTGRES_DB"]
    # Calls in progress are recorded under the host name: two instances must not share one.
    hostnames = [service.get("hostname") for service in instances.values()]
    assert None not in hostnames and len(set(hostnames)) == len(hostnames)


def test_compose_environment_is_what_the_server_reads(compose):
    known = settings_read() | PENDING_SETTINGS
    for service in phoneagent_services(compose).values():
        env = service["environment"]
        assert set(env) <= known, set(env) - known
        settings = instance_settings(service)  # passes the server's validation
        assert settings.database_url
        # Credentials are never written here: each is required from .env or the shell.
        for credential in set(CREDENTIALS) - {"PUBLIC_URL"}:
            assert re.fullmatch(rf"\$\{{{credential}:\?[^}}]+\}}", env[credential]), credential
        with pytest.raises(LookupError):
            instance_env(service, {})
        # The example personas, read-only, where the server looks for them.
        [personas] = [
            v for v in service["volumes"] if v.split(":")[1] == str(settings.personas_dir)
        ]
        source, _, mode = personas.split(":")
        assert (INFRA / source).resolve() == EXAMPLE_PERSONAS.resolve() and mode == "ro"


def test_compose_start_up_waits_for_healthy_dependencies(compose):
    instances = phoneagent_services(compose)
    _, postgres = service_by_image(compose, "postgres:")
    check = postgres["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"]
    # Over TCP: during initialisation the image's temporary server listens on the socket only.
    assert check[check.index("-h") + 1] == "127.0.0.1"
    for service in instances.values():
        settings = instance_settings(service)
        [command] = [arg for arg in service["healthcheck"]["test"] if "http://" in arg]
        port, path = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", command).groups()
        assert int(port) == settings.port and path == "/readyz"
        assert ("GET", path) in app_routes()
        # A stopped instance drains, then flushes: Compose must not kill it before.
        assert seconds(service["stop_grace_period"]) >= settings.drain_seconds + 30
    _, lb = service_by_image(compose, "nginx:")
    assert lb["depends_on"] == {name: {"condition": "service_healthy"} for name in instances}


def test_env_example_lists_what_compose_needs_and_holds_no_secret(compose):
    text = ENV_EXAMPLE.read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    given = dict(line.split("=", 1) for line in lines)
    assert set(given.values()) == {""}  # names only: nothing real is ever committed
    documented = set(given) | set(re.findall(r"^# ?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    variables = compose_variables(compose)
    required = {name for name, ops in variables.items() if ops & {"?", ":?"}}
    assert required == set(given)
    assert set(variables) <= documented, set(variables) - documented
    assert ".env" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None


_NGINX_TOKEN = re.compile(r"""\s+|#[^\n]*|'([^']*)'|"([^"]*)"|([{};])|([^\s{};'"#]+)""")


def read_nginx(text: str) -> list[Directive]:
    """nginx's configuration syntax: directives, blocks, quotes, comments (no includes)."""
    tokens: list[tuple[str, bool]] = []  # (text, is punctuation)
    position = 0
    while position < len(text):
        match = _NGINX_TOKEN.match(text, position)
        assert match, f"nginx syntax at {text[position : position + 40]!r}"
        single, double, punct, word = match.groups()
        if punct:
            tokens.append((punct, True))
        elif word is not None or single is not None or double is not None:
            tokens.append((next(s for s in (word, single, double) if s is not None), False))
        position = match.end()

    def block(i: int, closing: bool) -> tuple[list[Directive], int]:
        directives: list[Directive] = []
        words: list[str] = []
        while i < len(tokens):
            token, punct = tokens[i]
            i += 1
            if punct and token == ";":
                directives.append(Directive(words[0], words[1:]))
                words = []
            elif punct and token == "{":
                inner, i = block(i, closing=True)
                directives.append(Directive(words[0], words[1:], inner))
                words = []
            elif punct:  # "}"
                assert closing and not words, "unbalanced }"
                return directives, i
            else:
                words.append(token)
        assert not closing and not words, "unterminated block or directive"
        return directives, i

    return block(0, closing=False)[0]


def named(directives: list[Directive], name: str) -> list[Directive]:
    return [d for d in directives if d.name == name]


def test_compose_load_balancer_round_robins_and_passes_websocket_upgrades(compose):
    instances = phoneagent_services(compose)
    _, lb = service_by_image(compose, "nginx:")
    # The official image includes conf.d/*.conf in its `http` block.
    [mount] = [v for v in lb["volumes"] if v.split(":")[1] == "/etc/nginx/conf.d/default.conf"]
    source, _, mode = mount.split(":")
    assert mode == "ro"
    http = read_nginx((INFRA / source).read_text())

    # Round robin over both instances, by service name, on the port they listen on.
    [upstream] = named(http, "upstream")
    ports = {instance_settings(service).port for service in instances.values()}
    servers = named(upstream.block, "server")
    assert {s.args[0] for s in servers} == {
        f"{name}:{port}" for name in instances for port in ports
    }
    balancing = {"ip_hash", "hash", "least_conn", "least_time", "random", "sticky"}
    assert not balancing & {d.name for d in upstream.block}
    if any("resolve" in s.args for s in servers):  # re-resolved names need both of these
        assert named(upstream.block, "zone") and named(http, "resolver")

    # Connection: upgrade when the client asks for one, close otherwise.
    [upgrade] = [
        d for d in named(http, "map") if d.args == ["$http_upgrade", "$connection_upgrade"]
    ]
    assert {(d.name, tuple(d.args)) for d in upgrade.block} == {
        ("default", ("upgrade",)),
        ("", ("close",)),
    }

    # Published on loopback, at the port of the instances' default PUBLIC_URL.
    [server] = named(http, "server")
    [listen] = named(server.block, "listen")
    [published] = lb["ports"]
    host_ip, host_port, container_port = published.split(":")
    assert host_ip == "127.0.0.1" and listen.args == [container_port]
    public_url = urlsplit(instance_settings(next(iter(instances.values()))).public_url)
    assert (public_url.hostname, public_url.port) == ("localhost", int(host_port))

    locations = {tuple(d.args): d.block for d in named(server.block, "location")}
    assert ("/",) in locations  # webhooks
    for block in locations.values():
        # No URI part: the request URI passes as Twilio sent (and signed) it.
        assert [d.args for d in named(block, "proxy_pass")] == [[f"http://{upstream.args[0]}"]]

    # The media stream's route: HTTP/1.1 with the hop-by-hop upgrade headers set again.
    assert ("GET", "/twilio/stream") in app_routes()
    stream = locations[("=", "/twilio/stream")]
    assert [d.args for d in named(stream, "proxy_http_version")] == [["1.1"]]
    headers = {d.args[0].lower(): d.args[1] for d in named(stream, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    assert headers["connection"] == "$connection_upgrade"
    [read_timeout] = named(stream, "proxy_read_timeout")
    longest_call = max(
        p.max_call_seconds for p in load_directory(EXAMPLE_PERSONAS).personas.values()
    )
    assert seconds(read_timeout.args[0]) >= longest_call


# --- the database set-up of infra/README.md ----------------------------------------------------


async def test_the_readmes_database_set_up_lets_phoneagent_create_its_tables(postgres_url):
    """The README's SQL, run as a superuser, gives a user that can migrate; so does its `GRANT`
    for a database someone else owns. Without either, PostgreSQL 15 refuses the tables."""
    import asyncpg
    from conftest import _admin

    from phoneagent.delivery.outbox import OutboxError
    from phoneagent.delivery.pg_outbox import SCHEMA_VERSION, database_schema

    readme = (INFRA / "README.md").read_text()
    [sql] = re.findall(r"```sql\n(.*?)```", readme, re.DOTALL)
    [grant] = re.findall(r"`(GRANT CREATE ON SCHEMA public TO phoneagent;)`", readme)
    name, password = f"t_readme_{secrets.token_hex(4)}", secrets.token_hex(12)
    other = f"{name}_other"

    def ours(statement: str) -> str:
        return re.sub(r"\bphoneagent\b", name, statement.replace("CHANGE-ME", password))

    server = postgres_url.rsplit("/", 1)[0]  # postgresql://postgres@host:port
    host = server.split("@", 1)[1]
    try:
        for statement in sql.split(";"):
            if statement.strip():
                _admin(postgres_url, ours(statement))
        url = f"postgresql://{name}:{password}@{host}/{name}"
        assert await database_schema(url, apply=True) == (SCHEMA_VERSION, SCHEMA_VERSION)

        # A database the user does not own: only the README's GRANT lets it create the tables.
        _admin(postgres_url, f'CREATE DATABASE "{other}"')
        other_url = f"postgresql://{name}:{password}@{host}/{other}"
        conn = await asyncpg.connect(f"{server}/{other}")
        try:
            if conn.get_server_version().major >= 15:
                with pytest.raises(OutboxError, match="permission denied"):
                    await database_schema(other_url, apply=True)
            await conn.execute(ours(grant))
        finally:
            await conn.close()
        assert await database_schema(other_url, apply=True) == (SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        for database in (name, other):
            _admin(postgres_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        _admin(postgres_url, f'DROP ROLE IF EXISTS "{name}"')
