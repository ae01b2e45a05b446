#!/usr/bin/env bash
# Validates the deployment without a cluster: renders every kustomization (base, overlays,
# examples) with the kustomize built into kubectl, validates every object against the Kubernetes
# JSON schemas (strict: unknown fields fail) for the oldest supported and the newest bundled
# Kubernetes version, then runs the policy checks of deploy/check_deploy.py on each rendering and
# on the Dockerfiles. The tools come from PyPI into target/deployenv, reinstalled only when
# deploy/validate-requirements.txt changes. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Oldest supported: the pod-index label (rank) needs 1.28, the preStop sleep action 1.30.
K8S_VERSIONS=(1.30.0 1.37.0)
# Every kustomization to render, with its policy profile (cpu, gpu, or base: no image tag yet)
# and whether it uses an external etcd. A kustomization under overlays/ or examples/ that is
# missing here fails the run, so a new overlay cannot go unchecked.
TARGETS=(
  "base:base"
  "overlays/cpu:cpu"
  "overlays/gpu:gpu"
  "examples/external-etcd:gpu:external-etcd"
)

ENV=target/deployenv
REQ=deploy/validate-requirements.txt
if ! cmp -s "$REQ" "$ENV/requirements.txt"; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  rm -rf "$ENV"
  python3 -m venv "$ENV"
  "$ENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$ENV/requirements.txt"
fi
KUBECTL="$ENV/bin/kubectl"
PY="$ENV/bin/python"

OUT=target/deploy-rendered
rm -rf "$OUT"
mkdir -p "$OUT"
failed=0

listed=""
for t in "${TARGETS[@]}"; do listed+=" ${t%%:*} "; done
for k in deploy/k8s/overlays/*/kustomization.yaml deploy/k8s/examples/*/kustomization.yaml; do
  dir="${k#deploy/k8s/}"; dir="${dir%/kustomization.yaml}"
  if [[ "$listed" != *" $dir "* ]]; then
    echo "FAIL deploy/k8s/$dir is not listed in TARGETS of $0" >&2
    failed=1
  fi
done

for t in "${TARGETS[@]}"; do
  IFS=: read -r dir profile etcd <<<"$t"
  out="$OUT/${dir//\//-}.yaml"
  if ! "$KUBECTL" kustomize "deploy/k8s/$dir" >"$out"; then
    echo "FAIL deploy/k8s/$dir does not render" >&2
    failed=1
    continue
  fi
  ok=1
  for v in "${K8S_VERSIONS[@]}"; do
    "$ENV/bin/kubernetes-validate" --kubernetes-version "$v" --strict --quiet "$out" || ok=0
  done
  extra=()
  [ "$etcd" = external-etcd ] && extra+=(--external-etcd)
  "$PY" deploy/check_deploy.py manifests "$out" --profile "$profile" "${extra[@]}" || ok=0
  objects=$(grep -c '^kind:' "$out")
  if [ "$ok" = 1 ]; then
    echo "ok   deploy/k8s/$dir: $objects objects, schemas ${K8S_VERSIONS[*]}, policy $profile"
  else
    echo "FAIL deploy/k8s/$dir" >&2
    failed=1
  fi
done

for d in deploy/Dockerfile:"" deploy/Dockerfile.cuda:cuda; do
  if "$PY" deploy/check_deploy.py dockerfile "${d%%:*}" --features "${d#*:}"; then
    echo "ok   ${d%%:*}"
  else
    echo "FAIL ${d%%:*}" >&2
    failed=1
  fi
done

if [ "$failed" != 0 ]; then
  echo "validate-deploy: FAILED (renderings in $OUT)" >&2
  exit 1
fi
echo "validate-deploy: all deployment checks passed"
