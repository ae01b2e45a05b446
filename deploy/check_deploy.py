#!/usr/bin/env python3
"""Policy checks on the deployment that schemas cannot express, run by scripts/validate-deploy.sh.

  check_deploy.py manifests RENDERED.yaml --profile base|cpu|gpu [--external-etcd]
  check_deploy.py dockerfile deploy/Dockerfile [--features cuda]

Each failed rule prints one line naming the object; the exit status is 1 if any rule failed.
"""

import argparse
import re
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "PriorityClass", "RuntimeClass"}
WORKER_GRPC_PORT = 50061
# Plaintext gRPC health only (the kubelet's probes cannot do TLS); the APIs take TLS.
WORKER_HEALTH_PORT = 50063
COORDINATOR_HEALTH_PORT = 50052
TLS_ENV = {
    "coordinator": ("YOCO_TLS_CERT", "YOCO_TLS_KEY", "YOCO_WORKER_TLS_CA", "YOCO_WORKER_TLS_CERT",
                    "YOCO_WORKER_TLS_KEY"),
    "worker": ("YOCO_TLS_CERT", "YOCO_TLS_KEY", "YOCO_TLS_CLIENT_CA"),
}


class Report:
    def __init__(self):
        self.errors = []

    def fail(self, where, message):
        self.errors.append(f"{where}: {message}")


def ident(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_template(obj):
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]
    return None


def selector_matches(selector, labels):
    """A label selector (matchLabels and matchExpressions) against a set of labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def env_map(container):
    return {e["name"]: e for e in container.get("env") or []}


def check_container(r, where, pod_spec, c, require_tag):
    pod_sc = pod_spec.get("securityContext") or {}
    sc = c.get("securityContext") or {}
    name = f"{where} container {c['name']}"
    if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
        r.fail(name, "runAsNonRoot is not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        r.fail(name, "runs as uid 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        r.fail(name, "readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        r.fail(name, "allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        r.fail(name, "is privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        r.fail(name, "does not drop ALL capabilities")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        r.fail(name, f"seccomp profile is {seccomp!r}, not RuntimeDefault")
    resources = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in (resources.get(kind) or {}):
                r.fail(name, f"no {kind}.{res}")
    image = c.get("image", "")
    if require_tag:
        tag = image.rsplit("/", 1)[-1]
        if "@" not in tag and (":" not in tag or tag.endswith(":latest")):
            r.fail(name, f"image {image!r} has no pinned tag")


def check_tls(r, where, pod_spec, c, role):
    """Every TLS file the container is pointed at lies on a mounted Secret volume."""
    env = env_map(c)
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for var in TLS_ENV[role]:
        path = (env.get(var) or {}).get("value")
        if not path:
            r.fail(where, f"{var} is not set: the {role} would serve or connect in plaintext")
            continue
        mount = next((name for at, name in mounts.items() if path.startswith(at.rstrip("/") + "/")), None)
        if mount is None or "secret" not in volumes.get(mount, {}):
            r.fail(where, f"{var}={path} is not on a mounted Secret")


def check_manifests(path, profile, external_etcd):
    r = Report()
    with open(path) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    templates = [(ident(o), pod_template(o)) for o in objs if pod_template(o)]

    # One namespace for everything namespaced.
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED}
    if len(namespaces) != 1 or None in namespaces:
        r.fail("objects", f"not all in one namespace: {sorted(map(str, namespaces))}")

    for o in objs:
        tpl = pod_template(o)
        if not tpl:
            continue
        where, spec = ident(o), tpl["spec"]
        containers = (spec.get("initContainers") or []) + spec["containers"]
        for c in containers:
            check_container(r, where, spec, c, require_tag=profile != "base")
        # References resolve to objects in the same rendering.
        if spec.get("serviceAccountName", "default") not in by_kind.get("ServiceAccount", {}):
            r.fail(where, f"service account {spec.get('serviceAccountName')!r} is not defined")
        claim_templates = {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates") or []}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                if claim not in by_kind.get("PersistentVolumeClaim", {}):
                    r.fail(where, f"volume {v['name']}: claim {claim!r} is not defined")
            if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                r.fail(where, f"volume {v['name']}: ConfigMap {v['configMap']['name']!r} is not defined")
        for c in containers:
            for src in c.get("envFrom") or []:
                ref = (src.get("configMapRef") or {}).get("name")
                if ref and ref not in by_kind.get("ConfigMap", {}):
                    r.fail(where, f"envFrom ConfigMap {ref!r} is not defined (a generated name not rewritten?)")
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    r.fail(where, f"mount of unknown volume {m['name']!r}")
        if o["kind"] != "Job":
            for c in spec["containers"]:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        r.fail(where, f"container {c['name']} has no {probe}")
        if o["kind"] == "StatefulSet":
            svc = by_kind.get("Service", {}).get(o["spec"].get("serviceName"))
            if not svc or svc["spec"].get("clusterIP") != "None":
                r.fail(where, f"serviceName {o['spec'].get('serviceName')!r} is not a headless Service here")
        if o["kind"] in ("Deployment", "StatefulSet"):
            if not selector_matches(o["spec"]["selector"], tpl["metadata"].get("labels") or {}):
                r.fail(where, "selector does not match its own pod template")

    # Selectors of Services, disruption budgets and network policies select some pods.
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for name, o in by_kind.get(kind, {}).items():
            sel = o["spec"].get("podSelector") if kind == "NetworkPolicy" else o["spec"].get("selector")
            if kind == "Service":
                sel = {"matchLabels": sel} if sel else None
            if not sel or not (sel.get("matchLabels") or sel.get("matchExpressions")):
                continue  # selects everything (default deny) or nothing by design
            if not any(selector_matches(sel, t["metadata"].get("labels") or {}) for _, t in templates):
                r.fail(f"{kind}/{name}", "selector matches no pod template")

    config = {}
    for name, cm in by_kind.get("ConfigMap", {}).items():
        if name.startswith("yoco-config"):
            config = cm.get("data") or {}

    # Worker groups.
    workers = [o for o in by_kind.get("StatefulSet", {}).values()
               if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "worker"]
    if profile != "base" and not workers:
        r.fail("workers", "no worker StatefulSet")
    groups = {}
    for o in workers:
        where, tpl = ident(o), o["spec"]["template"]
        labels = tpl["metadata"].get("labels") or {}
        group, world = labels.get("yoco/group"), labels.get("yoco/world")
        if not group:
            r.fail(where, "pod template has no yoco/group label")
        elif group in groups:
            r.fail(where, f"group {group!r} is also {groups[group]}")
        else:
            groups[group] = where
        if o["spec"]["selector"].get("matchLabels", {}).get("yoco/group") != group:
            r.fail(where, "selector does not pin the group (two groups' pods would mix)")
        if world is None or not world.isdigit() or int(world) != o["spec"].get("replicas", 1):
            r.fail(where, f"replicas {o['spec'].get('replicas', 1)} != yoco/world label {world!r}")
        c = next((c for c in tpl["spec"]["containers"] if c["name"] == "worker"), None)
        if c is None:
            r.fail(where, "no container named worker")
            continue
        env = env_map(c)
        expected = {"YOCO_RANK": "metadata.labels['apps.kubernetes.io/pod-index']",
                    "YOCO_GROUP": "metadata.labels['yoco/group']",
                    "YOCO_WORLD": "metadata.labels['yoco/world']"}
        for var, field in expected.items():
            got = ((env.get(var) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
            if got != field:
                r.fail(where, f"{var} comes from {got!r}, not {field}")
        for arg in ("--group=$(YOCO_GROUP)", "--rank=$(YOCO_RANK)", "--world=$(YOCO_WORLD)"):
            if arg not in (c.get("args") or []):
                r.fail(where, f"worker args lack {arg}")
        shm = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"]
        vols = {v["name"]: v for v in tpl["spec"].get("volumes") or []}
        if not shm or (vols.get(shm[0]["name"], {}).get("emptyDir") or {}).get("medium") != "Memory":
            r.fail(where, "/dev/shm is not a memory-backed emptyDir")
        for probe in ("livenessProbe", "readinessProbe"):
            if (c.get(probe) or {}).get("grpc", {}).get("port") != WORKER_HEALTH_PORT:
                r.fail(where, f"{probe} is not a gRPC probe on the health port {WORKER_HEALTH_PORT}")
        check_tls(r, where, tpl["spec"], c, "worker")
        gpus = int((c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
        if profile == "gpu" and gpus < 1:
            r.fail(where, "worker requests no nvidia.com/gpu in the gpu profile")
        if profile == "cpu" and gpus:
            r.fail(where, "worker requests nvidia.com/gpu in the cpu profile")

    # No GPU outside the workers; NCCL in the gpu profile.
    for where, tpl in templates:
        if where in groups.values():
            continue
        for c in tpl["spec"]["containers"]:
            if "nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}):
                r.fail(where, f"container {c['name']} requests a GPU")
    if profile == "gpu" and config.get("YOCO_TRANSPORT") != "nccl":
        r.fail("yoco-config", "YOCO_TRANSPORT is not nccl in the gpu profile")

    # The coordinator probes the gRPC health service.
    for o in by_kind.get("Deployment", {}).values():
        if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != "coordinator":
            continue
        for c in o["spec"]["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if (c.get(probe) or {}).get("grpc", {}).get("port") != COORDINATOR_HEALTH_PORT:
                    r.fail(ident(o), f"{probe} is not a gRPC probe on the health port {COORDINATOR_HEALTH_PORT}")
            check_tls(r, ident(o), o["spec"]["template"]["spec"], c, "coordinator")

    # etcd: bundled and consistent, or external and configured.
    etcd = by_kind.get("StatefulSet", {}).get("etcd")
    if external_etcd:
        if etcd or "etcd" in by_kind.get("Service", {}):
            r.fail("etcd", "bundled etcd objects remain with the external-etcd component")
        if config.get("YOCO_ETCD", "http://etcd:2379") == "http://etcd:2379":
            r.fail("yoco-config", "YOCO_ETCD still points at the bundled etcd")
    elif etcd is None:
        r.fail("etcd", "no etcd StatefulSet")
    else:
        n, svc, name = etcd["spec"]["replicas"], etcd["spec"]["serviceName"], etcd["metadata"]["name"]
        if n < 3 or n % 2 == 0:
            r.fail(ident(etcd), f"{n} members: use an odd number, at least 3")
        if not etcd["spec"].get("volumeClaimTemplates"):
            r.fail(ident(etcd), "members have no persistent volumes")
        args = etcd["spec"]["template"]["spec"]["containers"][0].get("args") or []
        initial = next((a.split("=", 1)[1] for a in args if a.startswith("--initial-cluster=")), "")
        want = ",".join(f"{name}-{i}=http://{name}-{i}.{svc}.$(POD_NAMESPACE).svc:2380" for i in range(n))
        if initial != want:
            r.fail(ident(etcd), f"--initial-cluster is {initial!r}, pods give {want!r}")
        if config.get("YOCO_ETCD") != "http://etcd:2379" or "etcd" not in by_kind.get("Service", {}):
            r.fail("yoco-config", "YOCO_ETCD does not point at the etcd Service")

    return r


def check_dockerfile(path, features):
    import dockerfile  # Docker's own parser (buildkit), shipped as a wheel

    r = Report()
    cmds = dockerfile.parse_file(path)
    args = {}
    for c in cmds:
        if c.cmd == "ARG" and "=" in c.value[0]:
            k, v = c.value[0].split("=", 1)
            args.setdefault(k, v)
    stages = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    if len(stages) < 2:
        r.fail(path, "not a multi-stage build")
        return r
    build, final = cmds[stages[0]:stages[-1]], cmds[stages[-1]:]
    want = "cargo build --release --locked -p yoco" + (f" --features {features}" if features else "")
    if not any(c.cmd == "RUN" and want in " ".join(c.value) for c in build):
        r.fail(path, f"no build stage runs `{want}`")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), final[0].value[0])
    if features == "cuda" and not re.match(r"(nvcr\.io/)?nvidia/cuda:[\d.]+-runtime-", base):
        r.fail(path, f"final stage is {base!r}, not an nvidia/cuda runtime image")
    users = [c.value[0] for c in final if c.cmd == "USER"]
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        r.fail(path, f"final stage runs as {uid!r}: use a numeric non-root USER")
    if not any(c.cmd == "COPY" and "--from=build" in c.flags for c in final):
        r.fail(path, "final stage does not copy the binary from the build stage")
    if not any(c.cmd == "ENTRYPOINT" for c in final):
        r.fail(path, "no ENTRYPOINT")
    try:
        with open(path + ".dockerignore") as f:
            ignored = f.read().split()
        if "target/" not in ignored and "target" not in ignored:
            r.fail(path + ".dockerignore", "does not exclude target/")
    except FileNotFoundError:
        r.fail(path, "no .dockerignore beside it: the build context would carry target/")
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("rendered")
    m.add_argument("--profile", choices=["base", "cpu", "gpu"], required=True)
    m.add_argument("--external-etcd", action="store_true")
    d = sub.add_parser("dockerfile")
    d.add_argument("path")
    d.add_argument("--features", default="")
    a = p.parse_args()
    if a.what == "manifests":
        r = check_manifests(a.rendered, a.profile, a.external_etcd)
    else:
        r = check_dockerfile(a.path, a.features)
    for e in r.errors:
        print(f"POLICY {e}", file=sys.stderr)
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
