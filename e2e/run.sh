#!/usr/bin/env bash
# End to end on kind, as a script: the same flow as e2e/test_e2e.py (read its docstring).
#
#   e2e/run.sh                     # from the repository root or anywhere
#   INTERCEPT_E2E_KEEP=1 e2e/run.sh  # keep the cluster afterwards
#
# Needs: docker (with a running engine), kind, kubectl, curl, and intercept (this
# repository's: `pip install -e .`; or set INTERCEPT="python -m intercept").
# The cluster gets its own kubeconfig file; yours is not touched.
#
# On a cluster that runs already, with the images on its node (no kind, no docker: the
# real node of `python -m e2e.cluster up`, as tests/test_cluster_e2e.py runs it):
#
#   INTERCEPT_E2E_KUBECONFIG=DIR/kubeconfig INTERCEPT_E2E_AGENT_IMAGE=intercept.test/agent:dev \
#   INTERCEPT_E2E_APP_IMAGE=intercept.test/sample:1 e2e/run.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="intercept-e2e-$$"
NS=intercept-e2e
SERVICE="echo"
AGENT_IMAGE="${INTERCEPT_E2E_AGENT_IMAGE:-intercept-agent:e2e}"
APP_IMAGE="${INTERCEPT_E2E_APP_IMAGE:-intercept-e2e-app:e2e}"
EXISTING="${INTERCEPT_E2E_KUBECONFIG:-}"
INTERCEPT="${INTERCEPT:-intercept}"
IDLE="${INTERCEPT_E2E_IDLE:-20}"
WORK="$(mktemp -d)"
export KUBECONFIG="${EXISTING:-$WORK/kubeconfig}"

say() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

for tool in $([[ -n "$EXISTING" ]] || echo docker kind) kubectl curl; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH (see https://kind.sigs.k8s.io for kind)"
done
[[ -n "$EXISTING" ]] || docker info >/dev/null 2>&1 || fail "the Docker engine is not running (docker info failed)"
$INTERCEPT --version >/dev/null || fail "'$INTERCEPT' does not run; pip install -e . or set INTERCEPT"

START_PID=""
cleanup() {
  local code=$?
  if [[ -n "$START_PID" ]]; then
    kill -INT "$START_PID" 2>/dev/null || true
    wait "$START_PID" 2>/dev/null || true
  fi
  [[ $code == 0 ]] && printf '\nPASS\n' || printf '\nFAIL (exit %s); intercept start said:\n%s\n' "$code" "$(cat "$WORK/start.log" 2>/dev/null)"
  if [[ -n "$EXISTING" ]]; then
    kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
    rm -rf "$WORK"
  elif [[ "${INTERCEPT_E2E_KEEP:-}" == 1 ]]; then
    echo "kept kind cluster $NAME; KUBECONFIG=$KUBECONFIG"
  else
    kind delete cluster --name "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

if [[ -z "$EXISTING" ]]; then
  say "kind cluster $NAME"
  kind create cluster --name "$NAME" --wait 180s

  say "images: $AGENT_IMAGE (agent_image/Dockerfile), $APP_IMAGE (e2e/app)"
  export DOCKER_BUILDKIT=1  # agent_image/Dockerfile mounts from a build stage
  docker build -f "$ROOT/agent_image/Dockerfile" -t "$AGENT_IMAGE" "$ROOT"
  docker build -t "$APP_IMAGE" "$ROOT/e2e/app"
  kind load docker-image --name "$NAME" "$AGENT_IMAGE" "$APP_IMAGE"
fi

say "sample app: Deployment $SERVICE (2 replicas) and Service $SERVICE in $NS"
sed "s|image: intercept-e2e-app:e2e|image: $APP_IMAGE|" "$ROOT/e2e/manifests.yaml" | kubectl apply -f -
kubectl -n "$NS" rollout status deployment/"$SERVICE" --timeout=600s
kubectl -n "$NS" get deployment "$SERVICE" -o jsonpath='{.spec}' >"$WORK/deployment.before"
kubectl -n "$NS" get service "$SERVICE" -o jsonpath='{.spec}' >"$WORK/service.before"

# Who serves GET / through the port the Service targets in POD (a port-forward), with optional header.
# The request is sent once; only starting kubectl port-forward is tried again (a local port taken
# meanwhile, a slow start), and what it said is shown when it never listened.
via_pod() {
  local pod=$1 header=${2:-} port local_port pid out attempt
  port=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.containers[*].ports[?(@.name=="http")].containerPort}')
  for attempt in 1 2 3; do
    local_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    kubectl -n "$NS" port-forward "pod/$pod" "$local_port:$port" >"$WORK/pf.log" 2>&1 & pid=$!
    for _ in $(seq 200); do
      grep -q Forwarding "$WORK/pf.log" && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    grep -q Forwarding "$WORK/pf.log" && break
    echo "  kubectl port-forward pod/$pod did not listen (attempt $attempt): $(cat "$WORK/pf.log")" >&2
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  done
  out=$(curl -fsS -o /dev/null -D - ${header:+-H "$header"} "http://127.0.0.1:$local_port/" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by"{print $2}')
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  [[ -n "$out" ]] || echo "  kubectl port-forward pod/$pod said: $(cat "$WORK/pf.log")" >&2
  echo "$out"
}

# COUNT requests to the Service from inside the cluster; prints who served each.
via_service() {
  local count=$1; shift
  local pod
  pod=$(kubectl -n "$NS" get pods -l app="$SERVICE" -o jsonpath='{.items[0].metadata.name}')
  kubectl -n "$NS" exec "$pod" -c app -- python /app/sample.py probe "http://$SERVICE.$NS/" -n "$count" "$@"
}

# The sample's pods that are not terminating.
pods() {
  kubectl -n "$NS" get pods -l app="$SERVICE" -o json | python3 -c '
import json, sys
for pod in json.load(sys.stdin)["items"]:
    if not pod["metadata"].get("deletionTimestamp"):
        print(pod["metadata"]["name"])'
}

# Retry CHECK (a function) until it passes: the cluster converges, it does not jump.
eventually() {
  local what=$1; shift
  for _ in $(seq 120); do "$@" && return 0; sleep 1; done
  fail "$what"
}

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
say "intercept start $SERVICE --header x-dev=e2e --port $PORT -- (local version)"
INTERCEPT_AGENT_IMAGE="$AGENT_IMAGE" $INTERCEPT start "$SERVICE" -n "$NS" --header x-dev=e2e --port "$PORT" \
  -- python3 "$ROOT/e2e/app/sample.py" serve --port "$PORT" --name local >"$WORK/start.log" 2>&1 &
START_PID=$!
for _ in $(seq 600); do
  grep -q '^intercept: ready: .*(2 replicas)' "$WORK/start.log" && break
  kill -0 "$START_PID" 2>/dev/null || fail "intercept start exited"
  sleep 1
done
grep '^intercept: ready: ' "$WORK/start.log" || fail "no ready line within 600s"

every_replica_routes() {
  local pod n=0
  for pod in $(pods); do
    n=$((n + 1))
    [[ "$(via_pod "$pod" 'x-dev: e2e')" == local ]] || { echo "  $pod: x-dev: e2e did not reach the local process"; return 1; }
    [[ "$(via_pod "$pod")" == "cluster/$pod" ]] || { echo "  $pod: a request without the header did not reach its app"; return 1; }
    echo "  $pod: x-dev: e2e -> local; no header -> cluster/$pod"
  done
  [[ $n == 2 ]]
}
service_routes() {
  local mine others
  mine=$(via_service 20 -H 'x-dev: e2e') || return 1
  others=$(via_service 20) || return 1
  [[ "$(sort -u <<<"$mine")" == local && -n "$others" ]] && ! grep -qv '^cluster/' <<<"$others"
}

say "matching requests reach the local process through every replica; others reach the cluster"
eventually "every replica routes by the header" every_replica_routes
eventually "requests through the Service are routed by the header" service_routes
echo "  through the Service: 20/20 with x-dev: e2e -> local; 20/20 without -> cluster"
say "idle ${IDLE}s, then again (the tunnel survives idleness)"
sleep "$IDLE"
every_replica_routes || fail "routing stopped after ${IDLE}s idle"

say "intercept leave $SERVICE"
$INTERCEPT leave "$SERVICE" -n "$NS"
mine_reach_cluster() {
  local pod
  for pod in $(pods); do [[ "$(via_pod "$pod" 'x-dev: e2e')" == "cluster/$pod" ]] || return 1; done
}
eventually "after leave, x-dev: e2e still reaches the local process" mine_reach_cluster
kill -INT "$START_PID" 2>/dev/null || true
wait "$START_PID" || fail "intercept start exited $? after leave and SIGINT"
START_PID=""

say "intercept uninstall $SERVICE"
$INTERCEPT uninstall "$SERVICE" -n "$NS"
kubectl -n "$NS" rollout status deployment/"$SERVICE" --timeout=600s
kubectl -n "$NS" get deployment "$SERVICE" -o jsonpath='{.spec}' >"$WORK/deployment.after"
kubectl -n "$NS" get service "$SERVICE" -o jsonpath='{.spec}' >"$WORK/service.after"
python3 - "$WORK" <<'EOF' || fail "the Deployment or Service spec differs from before"
import json, sys
work = sys.argv[1]
for kind in ("deployment", "service"):
    before, after = (json.load(open(f"{work}/{kind}.{when}")) for when in ("before", "after"))
    if before != after:
        print(f"  {kind} spec before: {json.dumps(before, sort_keys=True)}\n  {kind} spec after:  {json.dumps(after, sort_keys=True)}")
        sys.exit(1)
    print(f"  {kind} spec: as before")
EOF
no_agent() { ! kubectl -n "$NS" get pods -l app="$SERVICE" -o jsonpath='{.items[*].spec.containers[*].name}' | grep -q intercept-agent; }
eventually "pods still run the agent after uninstall" no_agent
if kubectl -n "$NS" get secret "intercept-$SERVICE" >/dev/null 2>&1; then fail "Secret intercept-$SERVICE is still there"; fi
echo "  no pod runs the agent; Secret intercept-$SERVICE is gone"
