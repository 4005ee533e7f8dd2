"""Every Kubernetes manifest in infra/k8s, rendered by kustomize, validates offline: core objects against
the Kubernetes schemas (kubernetes-validate), RayJob/RayCluster against KubeRay's CRD schemas, both
strict (an unknown field is an error). Then what the run needs of them: resume on retry, autoscaling
GPU workers from zero, credentials from the Secret only, non-root pods, a valid safecb config."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from safecb.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DATA = Path(__file__).parent / "data"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = ["base", "overlays/cpu-smoke", "overlays/gpu-1", "overlays/gpu-8", "interactive"]
GPUS = {"overlays/gpu-1": 1, "overlays/gpu-8": 8}
SECRET = "safecb-object-store"


def kustomize(folder: Path) -> list[dict]:
    """`kubectl kustomize` (or a standalone `kustomize build`) of one folder, offline."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(folder)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(folder)]
    else:
        pytest.fail("rendering infra/k8s needs kubectl (or kustomize) on PATH")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / name) for name in KUSTOMIZATIONS}


def _strict(schema):
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` does (the API
    server would silently prune them: a typo like `shutdownAfterJobFinish` would just vanish)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Validator:
    schema = _strict(json.loads((DATA / f"ray.io_{kind.lower()}s.v1.schema.json").read_text()))
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict) -> None:
    """Raise on the first schema violation of one rendered object."""
    if doc["apiVersion"] == "ray.io/v1":
        crd_validator(doc["kind"]).validate(doc)
        for template in pod_templates(doc):  # and the pod templates once more, against core's PodTemplateSpec
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_every_kustomization_is_validated():
    found = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_manifests_validate_against_kubernetes_and_kuberay_schemas(rendered, name):
    docs = rendered[name]
    assert {d["kind"] for d in docs} == ({"RayCluster"} if name == "interactive" else {"RayJob", "ConfigMap"})
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("damage", ["unknown_field", "wrong_type", "bad_container"])
def test_the_validation_catches_a_broken_manifest(rendered, damage):
    job = copy.deepcopy(of_kind(rendered["overlays/gpu-1"], "RayJob")[0])
    if damage == "unknown_field":
        job["spec"]["shutdownAfterJobFinish"] = True  # a typo the API server would drop silently
    elif damage == "wrong_type":
        job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    else:
        job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(job)


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if n != "interactive"])
def test_the_rayjob_resumes_on_retry_and_cleans_up(rendered, name):
    (job,) = of_kind(rendered[name], "RayJob")
    spec = job["spec"]
    assert re.search(r"\bsafecb run --config (\S+) --resume auto\b", spec["entrypoint"]), spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1  # retries exist, and resume (not restart) the run
    # No submitter pod to evict: the operator submits over HTTP (or from a sidecar of the head pod).
    assert spec["submissionMode"] in ("HTTPMode", "SidecarMode")


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_workers_autoscale_from_zero_with_the_gpus_the_overlay_names(rendered, name):
    (doc,) = [d for d in rendered[name] if d["kind"] in ("RayJob", "RayCluster")]
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    expected = GPUS.get(name, 1 if name == "interactive" else None)
    assert gpus == [None if expected is None else str(expected)]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_credentials_come_only_from_the_secret_and_pods_are_not_root(rendered, name):
    text = yaml.safe_dump_all(rendered[name])
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text  # no literal credentials
    for doc in rendered[name]:
        if doc["kind"] not in ("RayJob", "RayCluster"):
            continue
        for template in pod_templates(doc):
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
            assert template["spec"]["securityContext"]["runAsUser"] != 0
            for container in template["spec"]["containers"]:
                assert {"secretRef": {"name": SECRET}} in container["envFrom"]
                assert not container.get("env"), "settings go through the config; secrets through the Secret"


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if n != "interactive"])
def test_the_job_mounts_a_valid_safecb_config_for_the_cluster(rendered, name):
    (job,) = of_kind(rendered[name], "RayJob")
    (config_map,) = of_kind(rendered[name], "ConfigMap")
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mounted = {v["name"]: v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
    assert config_map["metadata"]["name"] in mounted.values()  # the overlay's own config, not the base's
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), f"{name}/config.yaml")
    assert config.cluster.address == "auto"  # the driver joins the job's cluster
    assert re.match(r"^[a-z0-9]+://", config.storage.run_dir)  # every pod reaches it: object storage
    if config.model.path:  # weights from an object-store prefix or a mounted volume, never the image
        volumes = [m["mountPath"] for g in cluster_spec(job)["workerGroupSpecs"]
                   for m in g["template"]["spec"]["containers"][0].get("volumeMounts", [])]
        assert "://" in config.model.path or any(config.model.path.startswith(v + "/") for v in volumes)
