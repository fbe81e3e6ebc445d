#!/usr/bin/env bash
# Build the container image, start it, wait for its healthcheck, embed over HTTP, stop it, print its size;
# then the same round through docker-compose.yaml when docker-compose (or `docker compose`) is installed.
# Takes minutes (the build exports the ONNX graph with torch). `.ci/run` runs it when AKIDB_TEST_CONTAINER=1.
#
# Machine specifics live here, not in the Dockerfile (environment variables, defaults in brackets):
#   AKIDB_BASE_IMAGE   base image [python:3.11-slim, or akidb-local/python:3.11-bookworm when that exists]
#   AKIDB_MAKE_BASE    a script that builds AKIDB_BASE_IMAGE when it is missing [../shared/docker/make-base.sh]
#   AKIDB_TORCH_WHEEL  a local torch CPU wheel to build with instead of the PyTorch index [/opt/wheels/torch-*cp311*.whl]
#   AKIDB_BUILD_NETWORK  docker build --network [host]
#   AKIDB_IMAGE        tag to build [akidb-embed:test]
#   AKIDB_HTTP_PORT    host port (127.0.0.1) the container's 8080 is published on [18080]
#   AKIDB_SKIP_BUILD=1 test an image already built
set -euo pipefail
cd "$(dirname "$0")/.."

image=${AKIDB_IMAGE:-akidb-embed:test}
port=${AKIDB_HTTP_PORT:-18080}
name=akidb-embed-test-$$
py=$(command -v python3)

say() { printf '[container-test] %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }

docker info >/dev/null 2>&1 || fail "docker is not running (apt-get install docker.io; dockerd &)"

# ---- build -------------------------------------------------------------------------------------------------
if [ -z "${AKIDB_BASE_IMAGE:-}" ]; then
    local_base=akidb-local/python:3.11-bookworm
    make_base=${AKIDB_MAKE_BASE:-../shared/docker/make-base.sh}
    if docker image inspect "$local_base" >/dev/null 2>&1; then
        AKIDB_BASE_IMAGE=$local_base
    elif [ -x "$make_base" ] || [ -f "$make_base" ]; then
        say "building the local base image with $make_base"
        bash "$make_base" "$local_base"
        AKIDB_BASE_IMAGE=$local_base
    else
        AKIDB_BASE_IMAGE=python:3.11-slim
    fi
fi
build_args=(--build-arg "BASE_IMAGE=$AKIDB_BASE_IMAGE")
wheel=${AKIDB_TORCH_WHEEL:-$(ls /opt/wheels/torch-*cp311*.whl 2>/dev/null | head -n 1 || true)}
if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || fail "AKIDB_TORCH_WHEEL=$wheel is not a file"
    ln -f "$wheel" docker/wheels/ 2>/dev/null || cp -f "$wheel" docker/wheels/
    build_args+=(--build-arg "TORCH_WHEEL=$(basename "$wheel")")
fi
if [ "${AKIDB_SKIP_BUILD:-0}" != 1 ]; then
    say "docker build: base $AKIDB_BASE_IMAGE, torch ${wheel:-from the PyTorch CPU index}"
    start=$(date +%s)
    DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build --network "${AKIDB_BUILD_NETWORK:-host}" "${build_args[@]}" \
        -t "$image" . >/tmp/akidb-container-build.log 2>&1 \
        || { tail -n 40 /tmp/akidb-container-build.log; fail "docker build failed (log: /tmp/akidb-container-build.log)"; }
    say "built $image in $(( $(date +%s) - start )) s"
fi

# ---- helpers -----------------------------------------------------------------------------------------------
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

wait_healthy() {   # wait_healthy CONTAINER: until its HEALTHCHECK says healthy (bounded), else fail with its logs
    local c=$1 state
    for _ in $(seq 1 90); do
        state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")
        case "$state" in
            "running healthy") return 0 ;;
            exited*|dead*) docker logs --tail 40 "$c" 2>&1; fail "$c exited before it was healthy" ;;
        esac
        sleep 2
    done
    docker logs --tail 40 "$c" 2>&1
    fail "$c not healthy within 180 s (state: $state)"
}

embed_http() {     # embed_http PORT: the seed curl body and the OpenAI shape, checked with the stdlib only
    "$py" - "$1" <<'EOF'
import json, math, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)
seed = post("/api/v1/embed", {"model": "sentence-transformers/all-MiniLM-L6-v2", "inputs": ["Hello, world!"],
                              "normalize": True})
vec = seed["embeddings"][0]
assert len(vec) == 384 and abs(math.sqrt(sum(x * x for x in vec)) - 1) < 1e-3, seed
oai = post("/v1/embeddings", {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": ["Hello, world!", "vector databases"]})
assert [len(d["embedding"]) for d in oai["data"]] == [384, 384], oai
cos = sum(a * b for a, b in zip(vec, oai["data"][0]["embedding"]))
assert cos > 0.9999, cos
print(f"/api/v1/embed: 384 floats, norm 1; /v1/embeddings: 2 x 384, usage {oai.get('usage')}, cosine {cos:.6f}")
with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
    text = resp.read().decode()
ok = [line for line in text.splitlines() if line.startswith("akidb_embed_requests_total{")]
print("/metrics:", "; ".join(ok) or "no akidb_embed_requests_total line")
EOF
}

# ---- docker run --------------------------------------------------------------------------------------------
say "docker run $image (127.0.0.1:$port -> 8080)"
docker run -d --name "$name" -p "127.0.0.1:$port:8080" "$image" >/dev/null
start=$(date +%s)
wait_healthy "$name"
say "healthy after $(( $(date +%s) - start )) s"
embed_http "$port" | sed 's/^/[container-test]   /'
say "inside: user $(docker exec "$name" id -un) (uid $(docker exec "$name" id -u)); torch importable: $(
    docker exec "$name" python -c 'import importlib.util as u; print(u.find_spec("torch") is not None)')"
# tcp listeners in the container (from /proc/net/tcp{,6}, state 0A = LISTEN): only the HTTP front's 8080
listeners=$(docker exec "$name" python -c '
ports = set()
for f in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(f).read().splitlines()[1:]
    except OSError:
        continue
    ports |= {int(r.split()[1].rsplit(":", 1)[1], 16) for r in rows if r.split()[3] == "0A"}
print(" ".join(map(str, sorted(ports))))')
say "tcp listeners in the container: $listeners"
[ "$listeners" = 8080 ] || fail "expected only 8080 to listen on tcp, got: $listeners"
docker exec "$name" akidb-embed health >/dev/null || fail "akidb-embed health over ipc inside the container failed"
say "ZeroMQ over ipc inside the container: $(docker exec "$name" akidb-embed health | head -n 1)"
start=$(date +%s)
docker stop -t 30 "$name" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
say "stopped in $(( $(date +%s) - start )) s, exit code $code"
[ "$code" = 0 ] || { docker logs --tail 40 "$name" 2>&1; fail "exit code $code after SIGTERM"; }
docker rm "$name" >/dev/null

# ---- docker-compose ----------------------------------------------------------------------------------------
compose=()
if command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then compose=(docker compose); fi
if [ ${#compose[@]} -gt 0 ]; then
    export AKIDB_IMAGE=$image AKIDB_HTTP_PORT=$port AKIDB_BASE_IMAGE
    project=akidbtest$$
    compose_down() { "${compose[@]}" -p "$project" down -v >/dev/null 2>&1 || true; cleanup; }
    trap compose_down EXIT
    say "${compose[*]} up (docker-compose.yaml, config mounted read-only, model cache volume)"
    "${compose[@]}" -p "$project" up -d --no-build >/dev/null 2>&1 || fail "${compose[*]} up failed"
    cid=$("${compose[@]}" -p "$project" ps -q akidb-embed)
    wait_healthy "$cid"
    embed_http "$port" | sed 's/^/[container-test]   /'
    case "$(docker logs "$cid" 2>&1 | head -n 1)" in "{"*) format=json ;; *) format=text ;; esac
    say "compose: restart policy $(docker inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$cid"), logs in $format"
    "${compose[@]}" -p "$project" down -v >/dev/null 2>&1
    say "compose: down"
else
    say "docker-compose not installed: compose round skipped"
fi

size=$(docker image inspect -f '{{.Size}}' "$image")
say "image $image: $(( size / 1000000 )) MB ($size bytes), base $AKIDB_BASE_IMAGE"
say "PASS"
