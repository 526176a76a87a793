"""deploy/kubernetes: schemas, the kustomization, cross-references, and the Deployment's command
line run for real."""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import (
    FIXTURE_MODEL, K8S, binary, check_sigterm_drain, load_docs, load_one, server_routes,
)

# The oldest Kubernetes these manifests target, and the newest the validator knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Files of deploy/kubernetes that are not resources of the kustomization.
NOT_RESOURCES = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}


# ---- validators ------------------------------------------------------------------------------

def _strict(schema):
    """additionalProperties: false on every object schema that lists its properties and says
    nothing of others (as kubernetes-validate's strict schemas do): a misspelt field fails."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


@functools.cache
def servicemonitor_validator():
    """ServiceMonitor's schema: prometheus-operator v0.80.1's CRD (openAPIV3Schema), as the
    package cloudcoil.models.prometheus_operator generated pydantic models from it (patterns,
    enums and types kept), turned back into a JSON schema, made strict."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = _strict(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "spec"})
    return jsonschema.Draft202012Validator(schema)


CRD_VALIDATORS = {("monitoring.coreos.com/v1", "ServiceMonitor"): servicemonitor_validator}


def validate(doc: dict) -> list[str]:
    """Every schema error of a manifest (empty: valid), against each of K8S_VERSIONS for the
    built-in kinds, against the CRD's schema for the CRD kinds. A kind with no schema is an
    error, never a pass."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_VALIDATORS:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"
                for e in CRD_VALIDATORS[key]().iter_errors(doc)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"k8s {version}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"k8s {version}: no schema: {e.message}")
    return errors


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_RESOURCES)


def by_kind(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        assert d["kind"] not in out, f"two objects of kind {d['kind']}"
        out[d["kind"]] = d
    return out


@pytest.fixture(scope="module")
def objs() -> dict[str, dict]:
    return by_kind([load_one(p) for p in manifests()])


def container(objs):
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str | None:
    """The value of --name in args (`--name=V` or `--name V`), or "" for a bare switch."""
    for i, a in enumerate(args):
        if a == f"--{name}":
            nxt = args[i + 1] if i + 1 < len(args) else None
            return nxt if nxt is not None and not nxt.startswith("--") else ""
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def with_filled_keys(example: Path, dest: Path) -> dict[str, str]:
    """The example keys file with a fresh random key in each empty `key`, written to dest;
    returns {name: key}."""
    text = example.read_text()
    keys = {}

    def fill(m):
        return f'key = "{secrets.token_urlsafe(24)}"'

    filled = re.sub(r'^key = ""$', fill, text, flags=re.M)
    assert filled != text, f"{example} has no empty key to fill"
    dest.write_text(filled)
    for k in tomllib.loads(filled)["keys"]:
        keys[k["name"]] = k["key"]
    return keys


# ---- the files -------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kust = load_one(K8S / "kustomization.yaml")
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    on_disk = {p.name for p in manifests()}
    assert set(listed) == on_disk, (
        f"kustomization.yaml's resources and deploy/kubernetes/*.yaml differ: only listed "
        f"{sorted(set(listed) - on_disk)}, only on disk {sorted(on_disk - set(listed))}"
    )


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_is_valid(path):
    for doc in load_docs(path):
        assert validate(doc) == [], f"{path.name}: {validate(doc)}"


# ---- the validator is known to reject ----------------------------------------------------------

def _broken(kind_file: str, edit) -> dict:
    doc = copy.deepcopy(load_one(K8S / kind_file))
    edit(doc)
    return doc


@pytest.mark.parametrize("what,kind_file,edit", [
    ("containerPort as a string", "deployment.yaml",
     lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0]
     .__setitem__("containerPort", "http")),
    ("a misspelt field (strict)", "deployment.yaml",
     lambda d: d["spec"]["template"]["spec"]["containers"][0]
     .__setitem__("readinessprobe", {"httpGet": {"path": "/ready", "port": 8000}})),
    ("terminationGracePeriodSeconds as a string", "deployment.yaml",
     lambda d: d["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", "90")),
    ("an HPA metric target without its type", "hpa.yaml",
     lambda d: d["spec"]["metrics"][0]["pods"]["target"].pop("type")),
    ("a Service port out of the schema's type", "service.yaml",
     lambda d: d["spec"]["ports"][0].__setitem__("port", [8000])),
    ("ServiceMonitor: interval not a duration", "servicemonitor.yaml",
     lambda d: d["spec"]["endpoints"][0].__setitem__("interval", "15 seconds")),
    ("ServiceMonitor: scheme outside the enum", "servicemonitor.yaml",
     lambda d: d["spec"]["endpoints"][0].__setitem__("scheme", "tcp")),
    ("ServiceMonitor: a misspelt field", "servicemonitor.yaml",
     lambda d: d["spec"]["endpoints"][0].__setitem__("paths", "/metrics")),
    ("ServiceMonitor: endpoints not a list", "servicemonitor.yaml",
     lambda d: d["spec"].__setitem__("endpoints", {"port": "http"})),
])
def test_validator_rejects(what, kind_file, edit):
    assert validate(_broken(kind_file, edit)) != [], f"the validator accepted {what}"


def test_validator_rejects_a_kind_it_has_no_schema_for():
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("no schema" in e for e in validate(doc))


# ---- kustomize -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """`kubectl kustomize` of a copy of deploy/kubernetes whose secrets/api-keys.toml is the
    example with its keys filled in: (docs, {key name: key})."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (kustomize) is missing: .ci/test-kubernetes.sh installs it"
    d = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, d)
    keys = with_filled_keys(d / "secrets" / "api-keys.example.toml", d / "secrets" / "api-keys.toml")
    out = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize failed:\n{out.stderr}"
    return [x for x in yaml.safe_load_all(out.stdout) if x], keys


def test_kustomize_renders_valid_objects(rendered, objs):
    docs, keys = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(list(objs) + ["Secret"]), kinds
    for doc in docs:
        assert validate(doc) == [], f"rendered {doc['kind']}: {validate(doc)}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "autoglm", doc["metadata"]


def test_kustomize_wires_image_and_secret(rendered):
    docs, keys = rendered
    r = by_kind(docs)
    kust = load_one(K8S / "kustomization.yaml")
    (image,) = kust["images"]
    pod = r["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"
    secret = r["Secret"]
    (gen,) = kust["secretGenerator"]
    assert secret["metadata"]["name"].startswith(gen["name"] + "-"), "no content hash suffix"
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    data = tomllib.loads(base64.b64decode(secret["data"]["api-keys.toml"]).decode())
    assert {k["name"]: k["key"] for k in data["keys"]} == keys


def test_kustomize_rejects_a_missing_keys_file(tmp_path):
    """Without secrets/api-keys.toml (git ignores it), `kubectl apply -k` fails instead of
    deploying without keys."""
    d = tmp_path / "kubernetes"
    shutil.copytree(K8S, d, ignore=shutil.ignore_patterns("api-keys.toml"))
    out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True)
    assert out.returncode != 0 and "api-keys.toml" in out.stderr, out.stderr


# ---- cross-references a schema cannot check ----------------------------------------------------

def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_pods(objs):
    dep = objs["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(objs["Service"]["spec"]["selector"], pod_labels)
    assert matches(objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(objs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"], pod_labels)
    for c in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert matches(c["labelSelector"]["matchLabels"], pod_labels)
    sm = objs["ServiceMonitor"]
    assert matches(sm["spec"]["selector"]["matchLabels"], objs["Service"]["metadata"]["labels"])
    ports = {p["name"] for p in objs["Service"]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports, f"ServiceMonitor scrapes port {ep['port']!r}, not in {ports}"
        assert ep["path"] in server_routes()
    ref = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        dep["apiVersion"], "Deployment", dep["metadata"]["name"])


def test_ports_and_probes_match_the_server(objs):
    c = container(objs)
    args = c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(flag(args, "port")) == ports["http"], "--port and the containerPort differ"
    assert flag(args, "host") == "0.0.0.0", "the server must listen on the pod's address"
    svc_port = objs["Service"]["spec"]["ports"][0]
    assert svc_port["port"] == 8000 and ports[svc_port["targetPort"]] == ports["http"]
    routes = server_routes()
    for kind, want in [("startupProbe", "/health"), ("livenessProbe", "/health"),
                       ("readinessProbe", "/ready")]:
        probe = c[kind]["httpGet"]
        assert probe["path"] == want and probe["path"] in routes, (kind, probe)
        assert ports.get(probe["port"], probe["port"]) == ports["http"], (kind, probe)
    np_ports = [p["port"] for r in objs["NetworkPolicy"]["spec"]["ingress"] for p in r["ports"]]
    assert np_ports == [ports["http"]], np_ports


def test_startup_probe_budget_covers_loading_a_9b_model(objs):
    p = container(objs)["startupProbe"]
    budget = p["failureThreshold"] * p["periodSeconds"]
    assert 600 <= budget <= 900, f"startup budget {budget} s; ~10 minutes wanted"


def test_termination_grace_covers_the_server_drain(objs):
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    args = container(objs)["args"]
    drain = float(flag(args, "shutdown-drain-delay"))
    grace = float(flag(args, "shutdown-grace"))
    pre_stop = container(objs).get("lifecycle", {}).get("preStop", {})
    sleep = float(pre_stop.get("sleep", {}).get("seconds", 0))
    assert "exec" not in pre_stop, "a preStop exec needs a shell in the image; use sleep"
    margin = pod["terminationGracePeriodSeconds"] - (sleep + drain + grace)
    assert margin >= 10, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} leaves {margin} s "
        f"after preStop {sleep} + drain {drain} + grace {grace}")
    assert drain >= 5 or sleep >= 5, "no time for the endpoints to drop the pod before it closes"


def test_pod_security_and_resources(objs):
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = container(objs)
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["automountServiceAccountToken"] is False
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]


def test_volumes_model_and_keys(objs):
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = container(objs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    # The model: the first argument, on the PVC, mounted read-only.
    model_arg = c["args"][0]
    assert not model_arg.startswith("-")
    model = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    assert volumes[model]["persistentVolumeClaim"]["claimName"] == \
        objs["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes[model]["persistentVolumeClaim"]["readOnly"] is True
    assert mounts[model]["readOnly"] is True
    assert model_arg.startswith(mounts[model]["mountPath"].rstrip("/") + "/")
    assert objs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    # The keys: --api-keys-file names a key of the generated Secret, in its mount.
    keys_file = flag(c["args"], "api-keys-file")
    secret = next(n for n, v in volumes.items() if "secret" in v)
    assert mounts[secret]["readOnly"] is True
    (gen,) = load_one(K8S / "kustomization.yaml")["secretGenerator"]
    assert volumes[secret]["secret"]["secretName"] == gen["name"]
    names = [f.split("=", 1)[0] for f in gen["files"]]
    assert keys_file == f"{mounts[secret]['mountPath']}/{names[0]}", (keys_file, names)
    # Every place the server may write is a mount (the root filesystem is read-only).
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert any(f"{env['XDG_CACHE_HOME']}/autoglm".startswith(m["mountPath"])
               for m in mounts.values() if not m.get("readOnly"))


def test_networkpolicy_peers(objs):
    (rule,) = objs["NetworkPolicy"]["spec"]["ingress"]
    peers = rule["from"]
    assert len(peers) == 2
    for p in peers:
        # One element with both selectors: the pod must match both (AND), not either.
        assert set(p) == {"namespaceSelector", "podSelector"}, p
    names = [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in peers]
    assert names == ["gateway", "prometheus"], names
    assert objs["NetworkPolicy"]["spec"]["egress"] == []


# ---- the Deployment's command line, run ------------------------------------------------------

def deployment_argv(objs, tmp_path: Path, keys_file: Path) -> tuple[list[str], dict, dict]:
    """The container's command and args with what only exists in a cluster replaced: the model
    volume's path by the bundled model, the Secret's file by keys_file, cuda by cpu, the pod's
    address and port by loopback and a free port. Returns (argv, env, the replacements)."""
    c = container(objs)
    assert c["command"][:1] == ["autoglm"], c["command"]
    args = list(c["args"])
    repl = {
        args[0]: str(FIXTURE_MODEL),
        f"--api-keys-file={flag(args, 'api-keys-file')}": f"--api-keys-file={keys_file}",
        "--device=cuda": "--device=cpu",
        "--host=0.0.0.0": "--host=127.0.0.1",
        "--port=8000": "--port=0",
    }
    for old in repl:
        assert old in args, f"{old!r} is no longer in the Deployment's args: update this test"
    argv = [str(binary())] + c["command"][1:] + [repl.get(a, a) for a in args]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for e in c.get("env", []):
        env[e["name"]] = e["value"]
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return argv, env, repl


def test_deployment_command_line_serves_and_drains(objs, tmp_path, start_server):
    keys = with_filled_keys(K8S / "secrets" / "api-keys.example.toml", tmp_path / "keys.toml")
    argv, env, repl = deployment_argv(objs, tmp_path, tmp_path / "keys.toml")
    print("replaced:", repl)
    server = start_server(argv, env)
    server.wait_listening()
    c = container(objs)
    # The probes answer without a key although keys are configured.
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = c[kind]["httpGet"]["path"]
        status, body = server.get(path)
        assert status == 200, f"{kind} {path}: {status} {body}"
    # --metrics-public: Prometheus scrapes without a key; the HPA's series is there.
    status, body = server.get("/metrics")
    assert status == 200, f"/metrics without a key: {status}"
    assert "autoglm_num_requests_waiting{" in body
    # The series the adapter turns into the HPA's metric, for the served model name.
    served = flag(c["args"], "served-model-name")
    assert f'vllm:num_requests_waiting{{model_name="{served}",engine="0"}} ' in body, body[-2000:]
    # The API needs a key from the Secret.
    assert server.get("/v1/models")[0] == 401
    status, body = server.get("/v1/models", {"Authorization": f"Bearer {keys['gateway']}"})
    assert status == 200 and f'"{flag(c["args"], "served-model-name")}"' in body, body
    assert server.get("/admin/models", {"Authorization": f"Bearer {keys['gateway']}"})[0] == 403
    assert server.get("/admin/models", {"Authorization": f"Bearer {keys['ops']}"})[0] == 200
    # SIGTERM, as the kubelet sends it: the drain the grace period is sized for.
    drain = float(flag(c["args"], "shutdown-drain-delay"))
    grace = float(flag(c["args"], "shutdown-grace"))
    limit = objs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    took = check_sigterm_drain(server, drain, grace, limit,
                               {"Authorization": f"Bearer {keys['gateway']}"})
    print(f"exited 0 {took:.1f} s after SIGTERM (drain {drain}, grace {grace}, kubelet {limit})")


def test_example_keys_are_refused_unchanged(objs, tmp_path, start_server):
    """The example's empty keys make the server refuse to start: it cannot go live unchanged."""
    example = K8S / "secrets" / "api-keys.example.toml"
    argv, env, _ = deployment_argv(objs, tmp_path, example)
    server = start_server(argv, env)
    rc = server.proc.wait(timeout=60)
    assert rc != 0 and "is empty" in server.log_text(), server.log_text()
