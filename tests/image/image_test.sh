#!/usr/bin/env bash
# make image-test: build the Dockerfile's images with podman, run the CPU image and check what a user relies on.
#
# python:3.12-slim and nvidia/cuda cannot be pulled here (no image registry), so both bases are stand-ins made
# from Debian packages (debootstrap + podman import), cached as podman images keyed on their recipe. Needs
# root, podman (runc or crun), debootstrap, curl, python3, haproxy, the project's .venv (make image-test makes
# it), and the network to Debian's mirror and PyPI.
#   tests/image/image_test.sh --preflight    exit 1 with the reason when this machine cannot run it
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), IMAGE_TEST_MAX_MB (default below).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# what the stand-ins hold: NVIDIA's CUDA runtime image has no Python; python:3.12-slim has it and a venv
CUDA_BASE_PACKAGES=passwd,ca-certificates
PYTHON_PACKAGES="python3 python3-venv python-is-python3"
# The CPU image was 707 MB when it carried onnxruntime-gpu (658 MB on today's stand-in base): its software at
# most about half of that. The bound leaves the models out (/app/exported: they grow with every version
# kept, and are the product): 367 MB measured on 2026-12-03 with ONNX Runtime 1.31, numpy 2.4 and grpcio.
MAX_IMAGE_MB=${IMAGE_TEST_MAX_MB:-380}
READY_TIMEOUT_S=90
CPU_TAG=localhost/digit-gen:image-test
CUDA_TAG=localhost/digit-gen:image-test-cuda

fail() { echo "image-test: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }

preflight() {
    [ "$(id -u)" = 0 ] || { echo "needs root (debootstrap; podman's --cpus on cgroup v1)"; return 1; }
    local tool
    for tool in podman debootstrap curl python3 haproxy; do
        command -v "$tool" >/dev/null || { echo "$tool is not installed"; return 1; }
    done
    command -v runc >/dev/null || command -v crun >/dev/null || { echo "neither runc nor crun is installed"; return 1; }
    podman info >/dev/null 2>&1 || { echo "podman cannot start: $(podman info 2>&1 | tail -n 1)"; return 1; }
}

if [ "${1:-}" = --preflight ]; then
    preflight
    exit
fi
why=$(preflight) || fail "$why"

started_at=$(now)
work=$(mktemp -d /tmp/digit-gen-image-test.XXXXXX)
containers=()
cleanup() {
    local id
    for id in "${containers[@]}"; do
        podman rm --force --time 10 "$id" > /dev/null 2>&1 || echo "image-test: could not remove container $id" >&2
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- podman on this kind of machine: a containers.conf of its own, the system's left alone ---
# Without CAP_SYS_RESOURCE a container cannot have podman's default rlimits (1048576 files and processes):
# ask for the hard limit on files here, and at most 32768 processes (podman 4.3 runs with no more itself).
# crun refuses a hybrid cgroup v1/v2 layout; runc runs on it.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nofile" != unlimited ] || nofile=1048576
[ "$nproc" != unlimited ] && [ "$nproc" -le 32768 ] || nproc=32768
{
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' "$nofile" "$nofile" "$nproc" "$nproc"
    if command -v runc >/dev/null; then printf '[engine]\nruntime = "runc"\n'; fi
} > "$work/containers.conf"
export CONTAINERS_CONF=$work/containers.conf

# --format docker: podman's default OCI format has no HEALTHCHECK. pip inside the build reaches PyPI as pip
# here does: through the CA bundle the host's pip configuration names (PIP_CERT, /etc/pip.conf's cert; else
# the system's), mounted read-only over the base's own bundle for the RUN steps. Nothing of it stays in the
# image: a mount onto a path the base lacks (/etc/pip.conf) would leave an empty file there (podman 4.3).
# Proxy variables go in as the build arguments Docker predefines for them, kept out of the image's history.
build_options=(--format docker --network host)
cert=${PIP_CERT:-$(sed -n 's/^ *cert *= *//p' /etc/pip.conf 2>/dev/null | head -n 1)}
cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$cert" ]; then build_options+=(--volume "$cert:/etc/ssl/certs/ca-certificates.crt:ro"); fi
for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    if [ -n "${!name:-}" ]; then build_options+=(--build-arg "$name"); fi
done

# --- the stand-in bases, cached as podman images keyed on this recipe ---
import_rootfs() {  # ROOTFS TAG: a podman image of the folder, slimmed as debian:bookworm-slim (under both bases)
    tar -C "$1" --exclude='./var/lib/apt/lists/*' --exclude='./var/cache/apt/*' --exclude='./usr/share/doc/*' \
        --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' --exclude='./usr/share/locale/*' -c . \
        | podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' --quiet - "$2" >/dev/null
}

make_bases() {  # CUDA_BASE PYTHON_BASE
    local rootfs=$work/rootfs
    # apt inside the chroot would use $TMPDIR, a path of the host's that the chroot lacks: unset it
    env -u TMPDIR debootstrap --variant=minbase --include="$CUDA_BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
        > "$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log"; fail "debootstrap $SUITE"; }
    import_rootfs "$rootfs" "$1"
    # shellcheck disable=SC2086  # the package list splits into words
    env -u TMPDIR DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -q --no-install-recommends \
        $PYTHON_PACKAGES > "$work/apt.log" 2>&1 \
        || { tail -n 20 "$work/apt.log"; fail "apt-get install $PYTHON_PACKAGES"; }
    import_rootfs "$rootfs" "$2"
}

recipe=$( { declare -f import_rootfs make_bases; echo "$SUITE $CUDA_BASE_PACKAGES $PYTHON_PACKAGES"; } \
    | sha256sum | cut -c 1-12)
cuda_base=localhost/digit-gen-stand-in:cuda-$recipe
python_base=localhost/digit-gen-stand-in:python-$recipe
t=$(now)
if podman image exists "$cuda_base" && podman image exists "$python_base"; then
    echo "image-test: stand-in bases $recipe cached"
else
    echo "image-test: making the stand-in bases from Debian $SUITE (debootstrap; cached afterwards)"
    make_bases "$cuda_base" "$python_base"
    echo "image-test: stand-in bases made in $(since "$t")"
fi

# --- the images ---
build() {  # TARGET TAG ARGS...: podman build, its log shown when it fails
    local target=$1 tag=$2 t
    shift 2
    t=$(now)
    podman build "${build_options[@]}" --target "$target" --tag "$tag" "$@" . > "$work/build-$target.log" 2>&1 \
        || { tail -n 40 "$work/build-$target.log"; fail "podman build --target $target"; }
    echo "image-test: $target image built in $(since "$t")"
}
build cpu "$CPU_TAG" --build-arg PYTHON_IMAGE="$python_base"
build cuda "$CUDA_TAG" --build-arg CUDA_IMAGE="$cuda_base"

# --- checks: each one is reported and the run goes on; the script fails at the end if any did ---
failures=0
check() {  # DESCRIPTION COMMAND...: "ok: DESCRIPTION" when the command succeeds, else "FAIL: DESCRIPTION"
    local description=$1
    shift
    if "$@"; then
        echo "image-test: ok: $description"
    else
        echo "image-test: FAIL: $description" >&2
        failures=$((failures + 1))
    fi
}

size_mb() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%d", $1 / 1e6}'; }
cpu_mb=$(size_mb "$CPU_TAG")
models_mb=$(podman run --rm --network none --no-healthcheck "$CPU_TAG" du -sb /app/exported | awk '{printf "%d", $1 / 1e6}')
software_mb=$((cpu_mb - models_mb))
echo "image-test: sizes: cpu $cpu_mb MB ($models_mb MB of it the models), cuda stand-in $(size_mb "$CUDA_TAG") MB, python stand-in base" \
     "$(size_mb "$python_base") MB"
check "the cpu image less its models ($software_mb MB) is at most $MAX_IMAGE_MB MB" [ "$software_mb" -le "$MAX_IMAGE_MB" ]

run_once() { podman run --rm --network none --no-healthcheck "$@"; }
onnxruntimes() {  # IMAGE: the ONNX Runtime distributions installed in it
    run_once "$1" python -c "from importlib.metadata import distributions
print(' '.join(sorted(d.metadata['Name'] for d in distributions() if d.metadata['Name'].startswith('onnxruntime'))))"
}
found=$(onnxruntimes "$CPU_TAG")
check "the cpu image has ONNX Runtime's CPU build alone ($found)" [ "$found" = onnxruntime ]
found=$(onnxruntimes "$CUDA_TAG")
check "the cuda image has ONNX Runtime's GPU build alone ($found)" [ "$found" = onnxruntime-gpu ]
bundle() { run_once "$1" sha256sum /etc/ssl/certs/ca-certificates.crt; }
check "the cpu image's CA bundle is its base's, not the host's the build mounted" \
    [ "$(bundle "$CPU_TAG")" = "$(bundle "$python_base")" ]

# --- the cpu image, running ---
start() {  # ARGS...: a container of them, started; its id in $container, kept for the cleanup before it starts
    container=$(podman create "$@")
    containers+=("$container")
    # without systemd podman says it cannot time the HEALTHCHECK: nothing here needs the timer
    podman start "$container" > /dev/null 2> "$work/start.err" || { cat "$work/start.err"; fail "podman start $*"; }
}
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
healthy() { podman healthcheck run "$1" >/dev/null 2>&1; }
show_logs() { echo "--- podman logs $1"; podman logs "$1" 2>&1 | tail -n 30; echo "---"; }

# One CPU, on the host's network, bound to loopback at a free port other than the default.
port=$(free_port)
[ "$port" != 8000 ] || port=$(free_port)
t=$(now)
start --network host --cpus 1 --env DIGITGEN_HOST=127.0.0.1 --env DIGITGEN_PORT="$port" "$CPU_TAG"
one_cpu=$container
# The defaults, in a network of its own: nothing on the host's port 8000 can answer for it.
start --network none "$CPU_TAG"
defaults=$container

url=http://127.0.0.1:$port
status=
for _ in $(seq "$READY_TIMEOUT_S"); do
    status=$(curl -s -o "$work/readyz.json" -w '%{http_code}' "$url/readyz" || true)
    [ "$status" = 200 ] && break
    [ "$(podman inspect --format '{{.State.Running}}' "$one_cpu")" = true ] \
        || { show_logs "$one_cpu"; fail "the container exited"; }
    sleep 1
done
[ "$status" = 200 ] || { show_logs "$one_cpu"; fail "/readyz answered $status after $READY_TIMEOUT_S s"; }
echo "image-test: /readyz 200 $(since "$t") after podman run"

every_model_ready() {
    python3 - "$work/readyz.json" exported/manifest.json <<'PYTHON'
import json, sys
ready, manifest = (json.load(open(path)) for path in sys.argv[1:])
missing = [model["name"] for model in manifest["models"] if not ready["models"].get(model["name"])]
print(f"not ready: {missing}" if missing else "", end="", file=sys.stderr)
sys.exit(1 if missing else 0)
PYTHON
}
check "/readyz shows every model of exported/manifest.json ready" every_model_ready

answer=$(curl -s -o "$work/three.png" -w '%{http_code} %{content_type}' "$url/generate?digit=3")
magic=$(head -c 8 "$work/three.png" | od -An -tx1 | tr -d ' \n')
check "/generate?digit=3 answers a PNG ($answer, $(stat -c %s "$work/three.png") bytes)" \
    [ "$answer $magic" = "200 image/png 89504e470d0a1a0a" ]

# each process's real and effective uid, its host pid and command line
podman top "$one_cpu" hpid args | tail -n +2 | while read -r hpid args; do
    echo "$(awk '/^Uid:/ { print $2, $3 }' "/proc/$hpid/status") $hpid $args"
done > "$work/processes"
check "every process runs as uid 10001 ($(wc -l < "$work/processes") processes)" \
    awk '$1 != 10001 || $2 != 10001 { bad = 1 } END { exit bad }' "$work/processes"
# uvicorn's workers are multiprocessing children (spawn_main) when there are several, else the process itself
spawned=$(grep -c spawn_main "$work/processes" || true)
workers=$(( spawned > 0 ? spawned : 1 ))
check "one worker under --cpus 1 ($workers)" [ "$workers" = 1 ]
check "the HEALTHCHECK is healthy with DIGITGEN_PORT=$port" healthy "$one_cpu"

for _ in $(seq "$READY_TIMEOUT_S"); do
    healthy "$defaults" && break
    sleep 1
done
check "the HEALTHCHECK is healthy at the default port (8000)" healthy "$defaults"

check "the app user's home is writable" \
    podman exec "$one_cpu" python -c "import os, pathlib, sys; sys.exit(not os.access(pathlib.Path.home(), os.W_OK))"
# ONNX Runtime's own lines start [W:onnxruntime... or [E:onnxruntime...
quiet_startup() { ! podman logs "$one_cpu" 2>&1 | grep -i -E 'warn|error|\[[WE]:'; }
check "no warning or error at startup" quiet_startup

# Two replicas as deploy/k8s/cpu-models-volume runs them, behind HAProxy: a new set published and reloaded
# under load (tests/image/two_replicas.py; the project's virtual environment: it renders the overlay).
t=$(now)
check "two replicas behind haproxy serve a newly published set after a SIGHUP each, no request failed" \
    "${IMAGE_TEST_PYTHON:-.venv/bin/python}" tests/image/two_replicas.py "$CPU_TAG"
echo "image-test: the two-replica run took $(since "$t")"

if [ "$failures" != 0 ]; then
    show_logs "$one_cpu"
    cat "$work/processes"
    fail "$failures check(s) failed (above), in $(since "$started_at")"
fi
echo "image-test: passed in $(since "$started_at")"
