#!/usr/bin/env bash
# Checks runfleet's deployment files without a cluster, kubectl or Docker:
#
#  1. renders every kustomization (deploy/k8s/base and each overlay) with
#     scripts/manifests.py, a renderer for the subset of kustomize deploy/k8s
#     uses (cross-checked against `kubectl kustomize` when kubectl is on PATH);
#  2. validates every rendered object against the Kubernetes OpenAPI schemas
#     of the oldest and newest supported Kubernetes (kubernetes-validate,
#     strict), KEDA's ScaledObject against a schema of its own, and the NATS
#     Helm values for the settings runfleet relies on;
#  3. scans the rendered manifests and deploy/Dockerfile with checkov, and
#     deploy/ for committed secrets, failing on every failed check that
#     deploy/.checkov.yaml does not skip with a reason (checkov gives no
#     severities without an API key).
#
# The tools are installed once (PyPI, pinned versions) into
# .tools/manifests-venv; after that the script works offline. Exits non-zero
# on any problem.
#
#   scripts/check-manifests.sh              # all checks
#   scripts/check-manifests.sh --render DIR # only render, to DIR/<name>.yaml
#                                           # (tests/deploy.rs reads these)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.tools/manifests-venv"
PY="$VENV/bin/python"

# Pinned: a newer checkov may add checks, a newer kubernetes-validate newer
# Kubernetes versions; bump them deliberately.
REQUIREMENTS=(checkov==3.3.30 kubernetes-validate==1.37.0)

render_dir=""
case "${1:-}" in
  "") ;;
  --render) render_dir="${2:?--render needs a directory}" ;;
  *) echo "usage: $0 [--render DIR]" >&2; exit 2 ;;
esac

installed() {
  [ -x "$PY" ] && "$PY" - "${REQUIREMENTS[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for req in sys.argv[1:]:
    name, want = req.split("==")
    if version(name) != want:
        sys.exit(1)
EOF
}
if ! installed; then
  echo "check-manifests: installing ${REQUIREMENTS[*]} into $VENV" >&2
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "check-manifests: python3 with venv and ensurepip is needed (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  python3 -m venv "$VENV" >&2
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check "${REQUIREMENTS[@]}" >&2; then
    echo "check-manifests: could not install ${REQUIREMENTS[*]} from PyPI (no network?)" >&2
    exit 1
  fi
fi

if [ -n "$render_dir" ]; then
  exec "$PY" "$ROOT/scripts/manifests.py" render "$render_dir"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0

echo "== render and validate (scripts/manifests.py)"
"$PY" "$ROOT/scripts/manifests.py" check "$work/rendered" || status=1

# checkov: never phone home (no API key, no policy download, no version check).
export BC_SKIP_MAPPING=TRUE CHECKOV_SKIP_VERSION_CHECK=true ANONYMOUS_TELEMETRY=false
checkov() {
  local name="$1"; shift
  echo "== checkov: $name"
  # checkov exits 1 on failed checks; the report decides.
  (cd "$work" && "$VENV/bin/checkov" --config-file "$ROOT/deploy/.checkov.yaml" -o json "$@" \
    >"$work/$name.json" 2>"$work/$name.log") || true
  "$PY" "$ROOT/scripts/manifests.py" checkov-report "$work/$name.json" || {
    sed -n '1,40p' "$work/$name.log" >&2
    status=1
  }
}
if [ -d "$work/rendered" ]; then
  checkov kubernetes --framework kubernetes -d "$work/rendered"
fi
checkov dockerfile --framework dockerfile -f "$ROOT/deploy/Dockerfile"
checkov secrets --framework secrets -d "$ROOT/deploy"

if [ "$status" = 0 ]; then
  echo "check-manifests: all checks passed"
else
  echo "check-manifests: FAILED" >&2
fi
exit "$status"
