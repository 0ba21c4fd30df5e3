#!/usr/bin/env python3
"""Render and validate runfleet's Kubernetes manifests without kubectl.

Used by scripts/check-manifests.sh (which runs it in a venv holding PyYAML,
kubernetes-validate and jsonschema):

    manifests.py render OUT_DIR     # every kustomization -> OUT_DIR/<name>.yaml
    manifests.py check OUT_DIR      # render, then validate every object
    manifests.py checkov-report R   # summarize a checkov JSON report, fail on failures

The renderer implements the subset of kustomize that deploy/k8s uses, with
kustomize's semantics, and refuses anything else rather than render it
wrongly:

- ``resources``: files (multi-document YAML) and directories holding a
  kustomization (built recursively, with their own transformers);
- ``configMapGenerator``: ``files`` and ``literals``, behavior ``create``, with
  kustomize's content-hash name suffix (so a configuration change rolls the
  pods) and the references in pod specs renamed to match;
- ``patches``: strategic-merge patches (targeted by the patch's kind and name;
  lists of containers, env, volumes, ... merged by name; ``null`` deletes) and
  JSON 6902 patches (``add``/``remove``/``replace`` with a kind/name target);
- ``namespace``, ``labels`` (without ``includeSelectors``) and ``images``.

Transformers run in kustomize's order (patches, namespace, labels, images).
When kubectl is on PATH, ``check`` also renders each kustomization with
``kubectl kustomize`` and requires the same objects, so this subset cannot
drift from the real thing unnoticed.

``check`` validates every object against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors) for the oldest and
the newest Kubernetes version runfleet supports; objects of CRDs that have no
schema there (KEDA's ScaledObject) are validated against a JSON schema
written here from the CRD, and unknown kinds are errors. It also checks the
NATS Helm values file for the settings runfleet relies on.
"""

import copy
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
HELM_VALUES = os.path.join(ROOT, "deploy", "nats", "helm-values.yaml")

# The Kubernetes versions every object must be valid for: the oldest runfleet
# supports (docs/operations.md) and the newest kubernetes-validate knows.
MIN_KUBERNETES = "1.29.0"

KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "namespace", "resources", "configMapGenerator",
    "patches", "labels", "images",
}

# Kinds that have no namespace (kustomize's namespace transformer skips them).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
    "RuntimeClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "APIService", "CSIDriver", "Node",
}

# Strategic-merge list fields and their merge keys (from the Kubernetes API's
# patchMergeKey); any other list is replaced by the patch's.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "volumeMounts": "name", "env": "name",
    "imagePullSecrets": "name", "ports": "containerPort",
    "topologySpreadConstraints": "topologyKey",
}

# kustomize's legacy output order (the rest follow, by kind and name).
KIND_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition",
    "ServiceAccount", "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding",
    "ClusterRoleBinding", "ConfigMap", "Secret", "Endpoints", "Service",
    "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]

GENERATED = "internal.runfleet.dev/generated-name"


class Error(Exception):
    pass


# ---------------------------------------------------------------- loading


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise Error(f"{rel(path)}: not valid YAML: {e}")
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise Error(f"{rel(path)}: every document must be an object with apiVersion and kind")
    return docs


def rel(path):
    return os.path.relpath(path, ROOT)


def kustomization_file(directory):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise Error(f"{rel(directory)}: no kustomization.yaml")


# ---------------------------------------------------------------- building


def build(directory):
    """Builds one kustomization directory into a list of objects, with the
    generated ConfigMaps still carrying their unhashed names."""
    path = kustomization_file(directory)
    with open(path, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Error(f"{rel(path)}: unsupported kustomization fields {sorted(unknown)} "
                    "(scripts/manifests.py implements only what deploy/k8s uses)")
    objects = []
    for entry in k.get("resources", []):
        target = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(target):
            objects.extend(build(target))
        elif os.path.isfile(target):
            objects.extend(load_docs(target))
        else:
            raise Error(f"{rel(path)}: resource {entry} does not exist")
    for gen in k.get("configMapGenerator", []):
        objects.append(generate_config_map(directory, path, gen))
    check_unique(objects, path)
    for patch in k.get("patches", []):
        apply_patch(objects, directory, path, patch)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        apply_labels(objects, path, entry)
    for image in k.get("images", []):
        apply_image(objects, path, image)
    return objects


def check_unique(objects, path):
    seen = set()
    for obj in objects:
        key = ident(obj)
        if key in seen:
            raise Error(f"{rel(path)}: {key} is defined twice")
        seen.add(key)


def ident(obj):
    md = obj.get("metadata", {})
    return f"{obj['kind']}/{md.get('namespace', '')}/{md.get('name')}"


def generate_config_map(directory, path, gen):
    allowed = {"name", "files", "literals", "behavior"}
    if set(gen) - allowed:
        raise Error(f"{rel(path)}: configMapGenerator fields {sorted(set(gen) - allowed)} are not supported")
    if gen.get("behavior", "create") != "create":
        raise Error(f"{rel(path)}: configMapGenerator behavior {gen['behavior']} is not supported")
    data = {}
    for entry in gen.get("files", []):
        key, _, file = entry.partition("=") if "=" in entry else (os.path.basename(entry), "", entry)
        with open(os.path.join(directory, file), encoding="utf-8") as f:
            data[key] = f.read()
    for entry in gen.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"], "annotations": {GENERATED: gen["name"]}},
        "data": data,
    }


def go_json(value):
    """JSON as Go's encoding/json writes it (sorted keys, no spaces, HTML
    characters escaped), which kustomize hashes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def config_map_hash(data):
    # kustomize (api/hasher) looks the name up as the single field
    # "metadata/name", finds nothing and hashes an empty name; do the same.
    digest = hashlib.sha256(go_json({"kind": "ConfigMap", "name": "", "data": data}).encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def finalize(objects):
    """Gives generated ConfigMaps their hashed names and renames the pod
    specs' references to them (kustomize's name-reference transformer)."""
    renames = {}
    for obj in objects:
        md = obj["metadata"]
        original = md.get("annotations", {}).pop(GENERATED, None)
        if original is None:
            continue
        if not md["annotations"]:
            del md["annotations"]
        md["name"] = f"{original}-{config_map_hash(obj['data'])}"
        renames[(md.get("namespace"), original)] = md["name"]
    for obj in objects:
        ns = obj.get("metadata", {}).get("namespace")
        for spec in pod_specs(obj):
            for vol in spec.get("volumes", []):
                rename(vol.get("configMap"), ns, renames)
                for src in vol.get("projected", {}).get("sources", []):
                    rename(src.get("configMap"), ns, renames)
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for env in c.get("env", []):
                    rename(env.get("valueFrom", {}).get("configMapKeyRef"), ns, renames)
                for env in c.get("envFrom", []):
                    rename(env.get("configMapRef"), ns, renames)
    return sorted(objects, key=sort_key)


def rename(ref, ns, renames):
    if ref and (ns, ref.get("name")) in renames:
        ref["name"] = renames[(ns, ref["name"])]


def sort_key(obj):
    kind = obj["kind"]
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    md = obj.get("metadata", {})
    return (rank, kind, md.get("namespace", ""), md.get("name", ""))


def pod_specs(obj):
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec.get("template", {}).get("spec", {})]
    if kind == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})]
    return []


def apply_patch(objects, directory, path, entry):
    if set(entry) - {"path", "patch", "target"}:
        raise Error(f"{rel(path)}: patch fields {sorted(set(entry) - {'path', 'patch', 'target'})} are not supported")
    if "path" in entry:
        with open(os.path.join(directory, entry["path"]), encoding="utf-8") as f:
            text = f.read()
        where = f"{rel(path)}: patch {entry['path']}"
    else:
        text = entry["patch"]
        where = f"{rel(path)}: inline patch"
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) == 1 and isinstance(docs[0], list):
        target = entry.get("target")
        if not target:
            raise Error(f"{where}: a JSON 6902 patch needs a target")
        json6902(select(objects, target, where), docs[0], where)
        return
    for doc in docs:
        if not isinstance(doc, dict):
            raise Error(f"{where}: neither a strategic-merge nor a JSON 6902 patch")
        target = entry.get("target") or {"kind": doc["kind"], "name": doc["metadata"]["name"]}
        for obj in select(objects, target, where):
            merged = strategic_merge(obj, doc)
            obj.clear()
            obj.update(merged)


def select(objects, target, where):
    if set(target) - {"kind", "name", "namespace"}:
        raise Error(f"{where}: target fields {sorted(set(target) - {'kind', 'name', 'namespace'})} are not supported")
    found = [o for o in objects
             if all(o.get("kind") == v if k == "kind" else o.get("metadata", {}).get(k) == v
                    for k, v in target.items())]
    if not found:
        raise Error(f"{where}: nothing matches target {target}")
    return found


def strategic_merge(original, patch):
    if not isinstance(original, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key == "$patch":
            raise Error(f"$patch directives are not supported ({value})")
        if value is None:
            result.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = merge_list(result[key], value, MERGE_KEYS[key])
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = strategic_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_list(original, patch, merge_key):
    """Items with a key the original has are merged into it; new items come
    first, in the patch's order (as kustomize's kyaml merge does)."""
    result = copy.deepcopy(original)
    new = []
    for item in patch:
        index = next((i for i, o in enumerate(result)
                      if isinstance(o, dict) and isinstance(item, dict)
                      and o.get(merge_key) == item.get(merge_key)), None)
        if index is None:
            new.append(copy.deepcopy(item))
        else:
            result[index] = strategic_merge(result[index], item)
    return new + result


def json6902(objects, ops, where):
    for obj in objects:
        for op in ops:
            kind = op.get("op")
            if kind not in ("add", "remove", "replace"):
                raise Error(f"{where}: op {kind} is not supported")
            parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
            parent = obj
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            last = parts[-1]
            try:
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, copy.deepcopy(op["value"]))
                    elif kind == "remove":
                        del parent[index]
                    else:
                        parent[index] = copy.deepcopy(op["value"])
                else:
                    if kind in ("remove", "replace") and last not in parent:
                        raise KeyError(last)
                    if kind == "remove":
                        del parent[last]
                    else:
                        parent[last] = copy.deepcopy(op["value"])
            except (KeyError, IndexError, ValueError):
                raise Error(f"{where}: {kind} {op['path']}: no such path in {ident(obj)}")


def apply_labels(objects, path, entry):
    if set(entry) - {"pairs", "includeSelectors", "includeTemplates"} or entry.get("includeSelectors"):
        raise Error(f"{rel(path)}: labels entries support only pairs and includeTemplates")
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
        if entry.get("includeTemplates") and obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            tmpl = obj["spec"]["template"].setdefault("metadata", {})
            tmpl.setdefault("labels", {}).update(entry["pairs"])


def split_image(image):
    name, digest = image.split("@", 1) if "@" in image else (image, None)
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def apply_image(objects, path, entry):
    if set(entry) - {"name", "newName", "newTag", "digest"}:
        raise Error(f"{rel(path)}: images fields {sorted(set(entry) - {'name', 'newName', 'newTag', 'digest'})} are not supported")
    for obj in objects:
        for spec in pod_specs(obj):
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name, tag, digest = split_image(c["image"])
                if name != entry["name"]:
                    continue
                name = entry.get("newName", name)
                if "digest" in entry:
                    c["image"] = f"{name}@{entry['digest']}"
                elif "newTag" in entry:
                    c["image"] = f"{name}:{entry['newTag']}"
                else:
                    c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def kustomizations():
    """Every kustomization runfleet ships: the base, then each overlay."""
    found = [("base", os.path.join(K8S, "base"))]
    overlays = os.path.join(K8S, "overlays")
    for name in sorted(os.listdir(overlays)):
        if os.path.isdir(os.path.join(overlays, name)):
            found.append((name, os.path.join(overlays, name)))
    return found


def render_all(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rendered = {}
    for name, directory in kustomizations():
        objects = finalize(build(directory))
        rendered[name] = objects
        with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump_all(objects, f, sort_keys=True, default_flow_style=False)
    return rendered


# ---------------------------------------------------------------- checking


def key_of(obj):
    return (obj["apiVersion"], ident(obj))


def compare_with_kubectl(name, directory, objects, problems):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return False
    run = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if run.returncode != 0:
        problems.append(f"{name}: kubectl kustomize failed: {run.stderr.strip()}")
        return True
    theirs = {key_of(o): o for o in yaml.safe_load_all(run.stdout) if o}
    ours = {key_of(o): o for o in objects}
    for key in sorted(set(theirs) | set(ours)):
        if key not in ours:
            problems.append(f"{name}: kubectl kustomize renders {key[1]}, scripts/manifests.py does not")
        elif key not in theirs:
            problems.append(f"{name}: scripts/manifests.py renders {key[1]}, kubectl kustomize does not")
        elif ours[key] != theirs[key]:
            diff = difflib.unified_diff(
                yaml.safe_dump(theirs[key], sort_keys=True).splitlines(),
                yaml.safe_dump(ours[key], sort_keys=True).splitlines(),
                "kubectl kustomize", "scripts/manifests.py", lineterm="")
            problems.append(f"{name}: {key[1]} differs from kubectl kustomize's rendering:\n"
                            + "\n".join(diff))
    return True


def validate_kubernetes(name, objects, versions, problems):
    import kubernetes_validate
    for obj in objects:
        if obj["apiVersion"] == "keda.sh/v1alpha1":
            validate_scaled_object(name, obj, versions, problems)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{name}: {ident(obj)}: no schema for {obj['apiVersion']} {obj['kind']} "
                                f"in Kubernetes {version} (a CRD? give it a schema in scripts/manifests.py)")
                break
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(p) for p in e.path)
                problems.append(f"{name}: {ident(obj)} is invalid for Kubernetes {version} at {where}: {e.message}")


# KEDA's ScaledObject (keda.sh/v1alpha1), the fields of its CRD that matter
# here, strictly: a misspelt field fails instead of being ignored by KEDA.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": STRING_MAP, "annotations": STRING_MAP},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                   "apiVersion": {"type": "string"},
                                   "envSourceContainerName": {"type": "string"}},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"},
                                   "behavior": {"type": "string"}},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "required": ["formula", "target"],
                            "additionalProperties": False,
                            "properties": {
                                "formula": {"type": "string"},
                                "target": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                                "activationTarget": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": STRING_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                        # The nats-jetstream scaler's metadata, from its source.
                        "if": {"properties": {"type": {"const": "nats-jetstream"}}},
                        "then": {"properties": {"metadata": {
                            "required": ["natsServerMonitoringEndpoint", "account", "stream", "consumer"],
                            "additionalProperties": False,
                            "properties": {k: {"type": "string"} for k in (
                                "natsServerMonitoringEndpoint", "account", "stream", "consumer",
                                "lagThreshold", "activationLagThreshold", "useHttps")},
                        }}},
                    },
                },
            },
        },
    },
}


def validate_scaled_object(name, obj, versions, problems):
    import jsonschema
    import kubernetes_validate
    for e in jsonschema.Draft7Validator(SCALED_OBJECT_SCHEMA).iter_errors(obj):
        where = "/".join(str(p) for p in e.path)
        problems.append(f"{name}: {ident(obj)} is invalid at {where}: {e.message}")
    spec = obj.get("spec", {})
    names = [t.get("name") for t in spec.get("triggers", [])]
    modifiers = spec.get("advanced", {}).get("scalingModifiers")
    if modifiers:
        for trigger_name in names:
            if trigger_name is None:
                problems.append(f"{name}: {ident(obj)}: with scalingModifiers every trigger needs a name")
            elif trigger_name not in modifiers["formula"]:
                problems.append(f"{name}: {ident(obj)}: trigger {trigger_name} is not in the formula")
    if len(set(names)) != len(names):
        problems.append(f"{name}: {ident(obj)}: trigger names repeat")
    # KEDA hands this to the HorizontalPodAutoscaler it creates: check it
    # against the real autoscaling/v2 schema.
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "behavior-check"},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                        "behavior": behavior}}
        for version in versions:
            try:
                kubernetes_validate.validate(hpa, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{name}: {ident(obj)}: horizontalPodAutoscalerConfig.behavior is invalid "
                                f"for Kubernetes {version}: {e.message}")


def check_helm_values(problems):
    """The settings runfleet relies on in the NATS chart's values."""
    with open(HELM_VALUES, encoding="utf-8") as f:
        values = yaml.safe_load(f)

    def get(path):
        node = values
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    expected = {
        "config.cluster.enabled": True,
        "config.cluster.replicas": 3,
        "config.jetstream.enabled": True,
        "config.jetstream.fileStore.enabled": True,
        "config.jetstream.fileStore.pvc.enabled": True,
        "config.jetstream.memoryStore.enabled": False,
        "config.monitor.enabled": True,
    }
    for path, want in expected.items():
        if get(path) != want:
            problems.append(f"deploy/nats/helm-values.yaml: {path} should be {want!r}, is {get(path)!r}")
    tag = str(get("container.image.tag") or "")
    try:
        major, minor = (int(x) for x in tag.split("-")[0].split(".")[:2])
        if (major, minor) < (2, 12):
            raise ValueError
    except ValueError:
        problems.append(f"deploy/nats/helm-values.yaml: container.image.tag {tag!r} is not nats-server 2.12 or newer")
    if "RUNFLEET" not in (get("config.merge.accounts") or {}):
        problems.append("deploy/nats/helm-values.yaml: config.merge.accounts has no RUNFLEET account "
                        "(the KEDA triggers and the Secrets name it)")


def check(out_dir):
    import kubernetes_validate.utils as kv_utils
    versions = [MIN_KUBERNETES, kv_utils.latest_version()]
    problems = []
    rendered = render_all(out_dir)
    compared = []
    for name, directory in kustomizations():
        objects = rendered[name]
        validate_kubernetes(name, objects, versions, problems)
        if compare_with_kubectl(name, directory, objects, problems):
            compared.append(name)
        print(f"  {name}: {len(objects)} objects rendered, validated for Kubernetes {' and '.join(versions)}")
    print("  rendering cross-checked with kubectl kustomize: "
          + (", ".join(compared) if compared else "no (kubectl not on PATH)"))
    check_helm_values(problems)
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    return 1 if problems else 0


def checkov_report(path):
    """Prints a checkov JSON report's failures; non-zero if anything failed,
    could not be parsed, or nothing was scanned at all."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        reports = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        print(f"ERROR checkov wrote no JSON report:\n{text[:2000]}", file=sys.stderr)
        return 1
    if isinstance(reports, dict):
        reports = [reports]
    status = 0
    scanned = 0
    for report in reports:
        summary = report.get("summary", {})
        kind = report.get("check_type", "?")
        scanned += summary.get("passed", 0) + summary.get("failed", 0) + summary.get("skipped", 0)
        print(f"  {kind}: {summary.get('passed', 0)} passed, {summary.get('failed', 0)} failed, "
              f"{summary.get('skipped', 0)} skipped inline, {summary.get('parsing_errors', 0)} parsing errors "
              f"(checkov {summary.get('checkov_version', '?')})")
        for failed in report.get("results", {}).get("failed_checks", []):
            status = 1
            lines = failed.get("file_line_range") or ["?", "?"]
            print(f"ERROR {failed['check_id']} {failed.get('check_name', '')}: {failed.get('resource', '')} "
                  f"in {failed.get('file_path', '?')}:{lines[0]}-{lines[1]}", file=sys.stderr)
        if summary.get("parsing_errors"):
            status = 1
            print(f"ERROR checkov could not parse: {report.get('results', {}).get('parsing_errors')}", file=sys.stderr)
    if scanned == 0:
        print("ERROR checkov scanned nothing", file=sys.stderr)
        status = 1
    return status


def main(argv):
    def render(out_dir):
        render_all(out_dir)
        return 0

    commands = {"render": render, "check": check, "checkov-report": checkov_report}
    if len(argv) != 3 or argv[1] not in commands:
        print("usage: manifests.py render OUT_DIR | check OUT_DIR | checkov-report REPORT.json", file=sys.stderr)
        return 2
    try:
        return commands[argv[1]](argv[2])
    except Error as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
