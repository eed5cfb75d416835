"""Kubernetes manifests (deploy/kubernetes): both overlays render, every document validates strictly against
the Kubernetes schemas, and the manifests agree with the code (ports, probe paths, ``HYBRIDCN_*`` settings,
secrets, network policies).

Rendering needs no kubectl: :func:`render` is a small kustomize for exactly the features these kustomizations
use (``resources``, ``namespace``, ``images``, ``patches`` as strategic merges named by kind and name) and
refuses anything else. Where ``kubectl`` or ``kustomize`` is installed, a test checks that it renders the same.
"""

from __future__ import annotations

import copy
import inspect
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "hybridcn"
# Triton's own default ports (the manifests start tritonserver without port flags)
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# what `hybridcn batch` / `batch-reports` read besides their flags (the batch CLI's documented variables)
BATCH_ENV = {"HYBRIDCN_LEDGER", "HYBRIDCN_MAX_SLIDE_PIXELS", "HYBRIDCN_REPOSITORY"}
# the oldest Kubernetes the README asks for, and the newest schemas kubernetes-validate has
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

# --- a small kustomize --------------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
NAMESPACED = {"Namespace": False, "PersistentVolumeClaim": True, "Deployment": True, "Service": True,
              "HorizontalPodAutoscaler": True, "StatefulSet": True, "Job": True, "CronJob": True,
              "NetworkPolicy": True, "Secret": True}
# strategic merge: lists of these fields merge item by item on the key; the lists named in REPLACED are
# replaced whole (as Kubernetes' own patch strategy says); a patch with any other list is refused
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}
REPLACED = {"tolerations", "command", "args"}


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base, patch, field: str = ""):
    if isinstance(patch, dict):
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        merged = dict(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise NotImplementedError(f"patch directive {key} is not supported by this renderer")
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value, key)
        return merged
    if isinstance(patch, list):
        if field in REPLACED:
            return copy.deepcopy(patch)
        if field not in MERGE_KEYS:
            raise NotImplementedError(f"no merge strategy here for the list {field!r}")
        # as kustomize orders them: the patch's items first, in its order (merged into the ones they name),
        # then the others; so a patched env variable moves before the ones it may refer to as $(NAME)
        key = MERGE_KEYS[field]
        base = base or []
        named = {item[key] for item in patch}
        merged = [_merge(next((old for old in base if old[key] == item[key]), None), item, "") for item in patch]
        return merged + [copy.deepcopy(old) for old in base if old[key] not in named]
    return patch


def _set_images(node, images: list[dict]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                name, _, tag = re.fullmatch(r"(.+?)(:([^:/@]+))?", value.split("@")[0]).groups()
                for image in images:
                    if set(image) - {"name", "newName", "newTag"}:
                        raise NotImplementedError("images: only name, newName and newTag are supported here")
                    if image["name"] == name:
                        node[key] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render(directory: Path) -> list[dict]:
    """The documents ``kubectl kustomize directory`` writes, for the features listed in the module's doc."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization keys {sorted(unknown)} are not supported here")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else _load(path)
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise NotImplementedError(f"{directory}: only patches given by path are supported here")
        for patch in _load(directory / patch_entry["path"]):
            targets = [i for i, doc in enumerate(docs) if doc["kind"] == patch["kind"]
                       and doc["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(targets) == 1, f"{patch_entry['path']}: {len(targets)} documents match"
            docs[targets[0]] = _merge(docs[targets[0]], patch)
    _set_images(docs, kustomization.get("images", []))
    if "namespace" in kustomization:
        for doc in docs:
            if NAMESPACED[doc["kind"]]:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(KUBE / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def example_secrets() -> list[dict]:
    return _load(KUBE / "secrets.example.yaml")


# --- helpers over rendered documents ------------------------------------------------------------------------

def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_templates(docs: list[dict]) -> list[tuple[dict, dict]]:
    """``(workload, pod template)`` of every Deployment, StatefulSet, Job and CronJob."""
    found = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            found.append((doc, doc["spec"]["template"]))
        elif doc["kind"] == "CronJob":
            found.append((doc, doc["spec"]["jobTemplate"]["spec"]["template"]))
    return found


def component(labels: dict) -> str:
    return labels["app.kubernetes.io/component"]


def pods_of(docs: list[dict], name: str) -> dict:
    (template,) = [t for _, t in pod_templates(docs) if component(t["metadata"]["labels"]) == name]
    return template["spec"]


def container(docs: list[dict], pod: str) -> dict:
    (main,) = pods_of(docs, pod)["containers"]
    return main


def env_of(main: dict) -> dict[str, dict]:
    return {item["name"]: item for item in main.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes' label selector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {"In": present and labels.get(key) in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


# --- the tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_validates_strictly(rendered, overlay, version):
    docs = rendered[overlay]
    assert {doc["kind"] for doc in docs} >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler",
                                             "StatefulSet", "Job", "NetworkPolicy", "PersistentVolumeClaim"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {error.message} at "
                        f"{'.'.join(map(str, error.path))}")


def test_example_secrets_validate_and_hold_only_placeholders(example_secrets):
    for doc in example_secrets:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
        assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == NAMESPACE
    data = {doc["metadata"]["name"]: doc["stringData"] for doc in example_secrets}
    assert "REPLACE-ME" in data["hybridcn-gateway"]["api-keys"]
    assert data["hybridcn-postgres"]["POSTGRES_PASSWORD"] == "REPLACE-ME"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_real_kustomize_renders_the_same(rendered, overlay):
    if shutil.which("kustomize"):
        command = ["kustomize", "build"]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize"]
    else:
        pytest.skip("neither kustomize nor kubectl is installed: only this module's renderer was checked")
    result = subprocess.run([*command, str(KUBE / "overlays" / overlay)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered[overlay]}
    assert sorted(theirs) == sorted(ours)
    for key, doc in ours.items():
        assert doc == theirs[key], f"{overlay}: {key} differs from {' '.join(command)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labels_selectors_and_services_fit_together(rendered, overlay):
    docs = rendered[overlay]
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "hybridcn", f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE
            assert labels.get("app.kubernetes.io/component")
    templates = pod_templates(docs)
    for workload, template in templates:
        pod_labels = template["metadata"]["labels"]
        assert pod_labels == {"app.kubernetes.io/name": "hybridcn",
                              "app.kubernetes.io/component": component(workload["metadata"]["labels"])}
        if "selector" in workload["spec"]:
            assert selects(workload["spec"]["selector"], pod_labels)
    for service in by_kind(docs, "Service").values():
        pods = [t for _, t in templates if selects({"matchLabels": service["spec"]["selector"]},
                                                   t["metadata"]["labels"])]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)} kinds of pod"
        named = {port["name"]: port["containerPort"] for c in pods[0]["spec"]["containers"] for port in c["ports"]}
        for port in service["spec"]["ports"]:
            assert named[port["targetPort"]] == port["port"]


def test_ports_match_the_code_and_each_other(rendered):
    from gateway.server import serve

    for docs in rendered.values():
        triton = container(docs, "triton")
        assert {p["name"]: p["containerPort"] for p in triton["ports"]} == TRITON_PORTS
        assert not [arg for arg in triton["command"] if "port" in arg], "ports must stay Triton's defaults"
        service = by_kind(docs, "Service")["triton"]
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == TRITON_PORTS

        gateway = container(docs, "gateway")
        gateway_port = inspect.signature(serve).parameters["port"].default
        assert [p["containerPort"] for p in gateway["ports"]] == [gateway_port] == [8000]
        command = gateway["command"]
        assert command[:3] == ["uvicorn", "gateway.app:create_app", "--factory"]
        assert command[command.index("--port") + 1] == str(gateway_port)
        assert [p["port"] for p in by_kind(docs, "Service")["gateway"]["spec"]["ports"]] == [gateway_port]
        # the gateway's Triton is the triton Service's gRPC port
        assert env_of(gateway)["HYBRIDCN_TRITON_URL"]["value"] == f"triton:{TRITON_PORTS['grpc']}"


def test_probes_hit_what_the_servers_answer(rendered):
    from gateway.app import create_app

    served = {path for path, methods in create_app(GatewaySettings()).openapi()["paths"].items() if "get" in methods}
    for docs in rendered.values():
        gateway = container(docs, "gateway")
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe"):
            assert gateway[probe]["httpGet"]["path"] in served
            assert gateway[probe]["httpGet"]["port"] == "http"
        triton = container(docs, "triton")
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert triton["command"][:3] == ["tritonserver", "--model-repository=/models", "--strict-model-config=true"]
        postgres = container(docs, "postgres")
        assert "pg_isready" in " ".join(postgres["readinessProbe"]["exec"]["command"])


def test_every_hybridcn_variable_is_one_the_code_reads(rendered):
    gateway_env = {f"HYBRIDCN_{name.upper()}" for name in GatewaySettings.model_fields}
    assert GatewaySettings.model_config["env_prefix"] == "HYBRIDCN_"
    for overlay, docs in rendered.items():
        for _, template in pod_templates(docs):
            allowed = gateway_env if component(template["metadata"]["labels"]) == "gateway" else BATCH_ENV
            for main in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                names = {name for name in env_of(main) if name.startswith("HYBRIDCN_")}
                assert names <= allowed, f"{overlay}: {main['name']} sets {sorted(names - allowed)}"
        gateway = env_of(container(docs, "gateway"))
        assert {"HYBRIDCN_TRITON_URL", "HYBRIDCN_REPOSITORY", "HYBRIDCN_API_KEYS", "HYBRIDCN_BATCH_JOBS_DIR"} <= set(
            gateway)


def test_keys_and_passwords_come_from_the_secrets(rendered, example_secrets):
    keys = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in example_secrets}
    for overlay, docs in rendered.items():
        assert not by_kind(docs, "Secret"), "an apply must never overwrite real secrets"
        for _, template in pod_templates(docs):
            for main in template["spec"]["containers"]:
                for item in main.get("env", []):
                    reference = item.get("valueFrom", {}).get("secretKeyRef")
                    if reference:
                        assert reference["key"] in keys[reference["name"]], f"{overlay}: {item['name']}"
                for source in main.get("envFrom", []):
                    assert source["secretRef"]["name"] in keys
        gateway = env_of(container(docs, "gateway"))
        assert gateway["HYBRIDCN_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "hybridcn-gateway",
                                                                              "key": "api-keys"}
        for pods in ("batch-worker", "batch-reports"):
            env = env_of(container(docs, pods))
            assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "POSTGRES_PASSWORD"
        postgres = container(docs, "postgres")
        assert postgres["envFrom"] == [{"secretRef": {"name": "hybridcn-postgres"}}]
        assert keys["hybridcn-postgres"] >= {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


def test_only_the_gpu_overlay_asks_for_a_gpu(rendered):
    gpu = container(rendered["gpu"], "triton")["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(rendered["cpu"])
    for overlay in OVERLAYS:
        for name in ("gateway", "batch-worker", "postgres"):
            assert "nvidia.com/gpu" not in str(container(rendered[overlay], name).get("resources"))


def test_each_overlay_serves_its_repository(rendered):
    """Triton, the gateway and the workers read one repository: the image of the overlay's target."""
    dockerfile = (ROOT / "deploy" / "models.Dockerfile").read_text()
    assert "--build-arg REPOSITORY=model_repository -t hybridcn-models:cpu" in dockerfile
    assert "--build-arg REPOSITORY=model_repository_gpu -t hybridcn-models:gpu" in dockerfile
    for overlay, docs in rendered.items():
        for name in ("triton", "gateway", "batch-worker", "batch-reports"):
            pod = pods_of(docs, name)
            (copier,) = pod["initContainers"]
            assert copier["image"] == f"hybridcn-models:{overlay}"
            assert copier["command"] == ["cp", "-a", "/models/.", "/repository/"]
            (target,) = [m["name"] for m in copier["volumeMounts"] if m["mountPath"] == "/repository"]
            (main,) = pod["containers"]
            assert {"name": target, "mountPath": "/models", "readOnly": True} in main["volumeMounts"]
            volumes = {volume["name"]: volume for volume in pod["volumes"]}
            assert "emptyDir" in volumes[target]
            if name != "triton":
                assert env_of(main)["HYBRIDCN_REPOSITORY"]["value"] == "/models"


def admitted(docs: list[dict], target: str) -> tuple[set[str], set[int]]:
    """The pod components that the one NetworkPolicy selecting ``target``'s pods lets in, and on which ports."""
    pods = {component(t["metadata"]["labels"]): t["metadata"]["labels"] for _, t in pod_templates(docs)}
    (policy,) = [p for p in by_kind(docs, "NetworkPolicy").values()
                 if selects(p["spec"]["podSelector"], pods[target])]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources, ports = set(), set()
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "only pods of this namespace"
            sources |= {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
        ports |= {port["port"] for port in rule["ports"]}
    return sources, ports


def test_network_policies_let_only_gateway_and_workers_reach_triton(rendered):
    for docs in rendered.values():
        assert admitted(docs, "triton") == ({"gateway", "batch-worker"}, {TRITON_PORTS["http"], TRITON_PORTS["grpc"]})
        assert admitted(docs, "postgres") == ({"batch-worker", "batch-reports"}, {5432})


def test_batch_workers_share_the_postgres_queue(rendered):
    for docs in rendered.values():
        job = by_kind(docs, "Job")["batch-workers"]["spec"]
        assert job["parallelism"] == job["completions"] >= 2
        assert job["completionMode"] == "Indexed" and job["suspend"] is True
        worker = container(docs, "batch-worker")
        script = " ".join(worker["args"][0].replace("\\\n", " ").split())
        assert ('hybridcn batch /slides --out "/results/$POD_NAME" --ledger "$HYBRIDCN_LEDGER" '
                "--triton triton:8001") in script
        env = env_of(worker)
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        ledger = env["HYBRIDCN_LEDGER"]["value"]
        service = by_kind(docs, "Service")["postgres"]
        assert ledger == f"postgresql://$(PGUSER)@{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" \
                         "/$(PGDATABASE)"
        names = list(env)  # $(NAME) expands only variables defined before it
        assert names.index("PGUSER") < names.index("HYBRIDCN_LEDGER") > names.index("PGDATABASE")
        volumes = {v["name"]: v for v in pods_of(docs, "batch-worker")["volumes"]}
        claims = by_kind(docs, "PersistentVolumeClaim")
        slides = claims[volumes["slides"]["persistentVolumeClaim"]["claimName"]]
        assert slides["spec"]["accessModes"] == ["ReadWriteMany"]
        reports = container(docs, "batch-reports")
        assert reports["command"][:4] == ["hybridcn", "batch-reports", "--ledger", "$(HYBRIDCN_LEDGER)"]
        names = list(env_of(reports))
        assert names.index("PGUSER") < names.index("HYBRIDCN_LEDGER") > names.index("PGDATABASE")
        assert env_of(reports)["HYBRIDCN_LEDGER"]["value"] == ledger


def test_postgres_keeps_its_data_and_the_gateway_autoscales(rendered):
    for docs in rendered.values():
        postgres = by_kind(docs, "StatefulSet")["postgres"]
        assert container(docs, "postgres")["image"] == "postgres:16"
        assert postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        service = by_kind(docs, "Service")["postgres"]
        assert service["spec"]["clusterIP"] == "None" and postgres["spec"]["serviceName"] == "postgres"

        hpa = by_kind(docs, "HorizontalPodAutoscaler")["gateway"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        deployment = by_kind(docs, "Deployment")["gateway"]
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        assert container(docs, "gateway")["resources"]["requests"]["cpu"]
