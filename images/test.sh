#!/usr/bin/env bash
# Builds the operator image (Dockerfile) and the worker base image (worker-image/Dockerfile) exactly
# as they are, with Debian's buildah, podman and runc (no registry, no Docker daemon), and smoke-tests
# both the way Kubernetes runs them: non-root, read-only root filesystem, all capabilities dropped.
#
#   images/test.sh            build (reusing cached base images and layers) and smoke-test
#   images/test.sh --clean    wipe the work folder first (target/images), then the same
#
# The base images the Dockerfiles name are made locally and tagged with the upstream names (see
# images/README.md for what each stand-in is). Everything lives in target/images: container storage,
# the build cache of RUN --mount=type=cache, logs and timings.txt. Exit status 0 means every stage passed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
here="$root/images"
work="$root/target/images"
version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/celery-operator/Chart.yaml")"
operator_image="ghcr.io/celery-operator/celery-operator:$version"
worker_image="ghcr.io/celery-operator/celery-worker-base:$version"
debian_image="docker.io/library/debian:bookworm-slim"
rust_image="docker.io/library/rust:1-bookworm"
distroless_image="gcr.io/distroless/cc-debian12:nonroot"
python_image="docker.io/library/python:3.12-slim-bookworm"
python_build_args=()

if [ "${1:-}" = "--clean" ]; then
  shift
  clean=1
fi

# === Stages: timing, load average, loud failures ===

stage_name=""
stage_start=0
stage_cpu=0
cpu=0
timings=()
containers=()   # started by this run: logs on failure, removed on exit
pids=()         # processes started by this run: stopped on exit
logs=()         # files whose tail is printed on failure

# CPU seconds (user + system) of every child process waited for so far: the build's compilers are
# counted, the containers (children of conmon) are not. Unlike wall time it barely depends on how
# busy the machine is.
cpu_seconds() {  # sets cpu; `times` must run in this shell, not in a $(...) subshell
  times >"$work/run/times"
  cpu=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] } } END { printf "%d", s }' \
    "$work/run/times")
}

stage() {
  stage_end
  stage_name="$1"
  stage_start=$(date +%s)
  if [ -d "$work/run" ]; then cpu_seconds; stage_cpu=$cpu; fi
  printf '\n=== %s (load average %s)\n' "$stage_name" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

stage_end() {
  [ -n "$stage_name" ] || return 0
  local took=$(( $(date +%s) - stage_start )) cpu=0
  if [ -d "$work/run" ]; then cpu_seconds; cpu=$(( cpu - stage_cpu )); fi
  timings+=("$(printf '%-18s %5ss wall %5ss cpu   load average at the end %s' \
    "$stage_name" "$took" "$cpu" "$(cut -d' ' -f1-3 /proc/loadavg)")")
  stage_name=""
}

fail() {
  echo "FAILED in stage '${stage_name:-setup}': $*" >&2
  exit 1
}

on_exit() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo >&2
    echo "images/test.sh FAILED in stage '${stage_name:-setup}' (exit $status)" >&2
    for c in "${containers[@]}"; do
      echo "--- podman logs $c (last 60 lines)" >&2
      podman logs --tail 60 "$c" >&2 2>&1 || true
    done
    for f in "${logs[@]}"; do
      echo "--- $f (last 40 lines)" >&2
      tail -n 40 "$f" >&2 2>/dev/null || true
    done
  fi
  for c in "${containers[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  stage_end
  if [ ${#timings[@]} -gt 0 ]; then
    printf '\nStage timings (%s cores):\n' "$(nproc)"
    printf '  %s\n' "${timings[@]}" | tee "$work/timings.txt"
  fi
  exit "$status"
}
trap on_exit EXIT

# Polls `$@` every half second until it succeeds or `timeout` seconds pass.
wait_until() {
  local timeout="$1" what="$2"
  shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

image_size() {
  podman image inspect --format '{{.Size}}' "$1"
}

# Refuses images that came out empty (a broken `tar | podman import` gives one without failing).
check_size() {
  local image="$1" min_mb="$2" size
  size=$(image_size "$image")
  [ "$size" -ge $(( min_mb * 1000 * 1000 )) ] || fail "$image is only $size bytes: the build produced an empty image"
  printf '%s: %s MB\n' "$image" $(( size / 1000 / 1000 ))
}

# === Tools and the work folder ===

stage tools
missing=()
for pair in buildah:buildah podman:podman runc:runc debootstrap:debootstrap redis-server:redis-server curl:curl \
            conmon:conmon python3:python3; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
buildah --version
podman --version
runc --version | head -1
command -v cargo >/dev/null || fail "cargo is needed to build the e2e control-plane double"

stage setup
exec 9>"$root/target/images.lock"
flock -n 9 || fail "another images/test.sh is running in this worktree"
if [ "${clean:-0}" = 1 ] && [ -d "$work" ]; then
  echo "removing $work"
  CONTAINERS_STORAGE_CONF="$work/conf/storage.conf" CONTAINERS_CONF="$work/conf/containers.conf" \
    podman system reset --force >/dev/null 2>&1 || true
  rm -rf "$work"
fi
mkdir -p "$work"/{conf,storage,run,tmp,logs,ctx,pip}
# Storage, runtime and temporary files all under target/images: nothing in /var/lib/containers.
cat >"$work/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run/storage"
EOF
# crun fails on this host's mixed cgroup hierarchy; runc with cgroupfs works. Podman's default
# rlimits exceed what a process without CAP_SYS_RESOURCE may set (buildah runs with nproc 32768).
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
[ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ] && nofile=65536
cat >"$work/conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$work/run/events.log"
tmp_dir = "$work/run/libpod"
EOF
# pip in the worker build trusts the host's CA bundle (mounted read-only with the CA directory);
# the config is mounted as a directory at build time only, so it is in no image layer.
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$work/pip/pip.conf"
export CONTAINERS_STORAGE_CONF="$work/conf/storage.conf"
export CONTAINERS_CONF="$work/conf/containers.conf"
# buildah keeps RUN --mount=type=cache directories under $TMPDIR/buildah-cache-<uid>.
export TMPDIR="$work/tmp"
# Leftovers of an interrupted run.
podman rm -a -f -t 0 >/dev/null 2>&1 || true
buildah rm --all >/dev/null 2>&1 || true
build=(buildah build --isolation chroot --layers --pull=never --network host)
ca_mount=(-v /etc/ssl/certs:/etc/ssl/certs:ro)

# === Base images, tagged with the upstream names the Dockerfiles use ===

stage base-debian
mirror="$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
mirror="${mirror:-http://deb.debian.org/debian}"
# Rebuilt when this recipe changes (the hash is stored as a label).
recipe=$(cat "$here/bases/debian-slim/"* <(echo "minbase bookworm $mirror") | sha256sum | cut -c1-16)
if [ "$(podman image inspect --format '{{index .Labels "dev.celery-operator.images.recipe"}}' "$debian_image" 2>/dev/null)" = "$recipe" ]; then
  echo "$debian_image: cached (recipe $recipe)"
else
  rootfs="$work/debootstrap"
  rm -rf "$rootfs"
  logs+=("$work/logs/debootstrap.log")
  echo "debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/logs/debootstrap.log" 2>&1 \
    || fail "debootstrap failed (see the log below)"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  # The apt and dpkg settings of the official slim image: no caches or docs left in layers.
  install -m 0644 "$here/bases/debian-slim/apt-docker-clean" "$rootfs/etc/apt/apt.conf.d/docker-clean"
  install -m 0644 "$here/bases/debian-slim/dpkg-docker-slim" "$rootfs/etc/dpkg/dpkg.cfg.d/docker"
  tar -C "$rootfs" --numeric-owner -cf - . | podman import \
    --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL dev.celery-operator.images.recipe=$recipe" \
    - "$debian_image" >/dev/null
  rm -rf "$rootfs"
fi
check_size "$debian_image" 50

stage base-rust
sysroot="$(rustc --print sysroot)"
echo "host toolchain: $(rustc --version) from $sysroot"
logs+=("$work/logs/base-rust.log")
"${build[@]}" -f "$here/bases/rust.Containerfile" -t "$rust_image" "$sysroot" >"$work/logs/base-rust.log" 2>&1 \
  || fail "building $rust_image"
check_size "$rust_image" 300

stage base-distroless
logs+=("$work/logs/base-distroless.log")
"${build[@]}" -f "$here/bases/distroless-cc.Containerfile" -t "$distroless_image" "$here/bases" \
  >"$work/logs/base-distroless.log" 2>&1 || fail "building $distroless_image"
check_size "$distroless_image" 5

stage base-python
# The host's CPython 3.12 (a --enable-shared build, e.g. pyenv's), relocated to /usr/local.
python_prefix=""
for candidate in "${IMAGES_PYTHON312_PREFIX:-}" "$(pyenv root 2>/dev/null)"/versions/3.12*; do
  if [ -n "$candidate" ] && [ -x "$candidate/bin/python3.12" ] \
     && "$candidate/bin/python3.12" -c 'import ssl, sqlite3, ctypes, ensurepip' 2>/dev/null; then
    python_prefix="$candidate"
  fi
done
logs+=("$work/logs/base-python.log")
if [ -n "$python_prefix" ] && [ "${IMAGES_PYTHON:-}" != debian ]; then
  echo "CPython from $python_prefix"
  ctx="$work/ctx/python"
  rm -rf "$ctx" && mkdir -p "$ctx"
  tar -C "$python_prefix" -cf - \
      --exclude='./lib/python3.12/test' --exclude='./lib/python3.12/idlelib' \
      --exclude='./lib/python3.12/tkinter' --exclude='./lib/python3.12/turtledemo' \
      --exclude='./lib/python3.12/lib-dynload/_tkinter*' --exclude='./lib/python3.12/lib-dynload/_test*' \
      --exclude='./lib/python3.12/site-packages/*' --exclude='__pycache__' --exclude='./bin/idle*' \
      --exclude='libpython*.a' \
      . | tar -C "$ctx" -xf -
  # The official image links with --strip-all.
  find "$ctx" -name '*.so*' -type f -exec strip --strip-unneeded {} +
  strip --strip-unneeded "$ctx/bin/python3.12"
  # Only pip from site-packages: other packages and .pth hooks of the host stay out.
  cp -a "$python_prefix"/lib/python3.12/site-packages/pip "$python_prefix"/lib/python3.12/site-packages/pip-*.dist-info \
     "$ctx/lib/python3.12/site-packages/"
  find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
  # Scripts and build settings name the old prefix.
  grep -rlI --null -F "$python_prefix" "$ctx/bin" "$ctx"/lib/python3.12/_sysconfigdata_* "$ctx"/lib/pkgconfig 2>/dev/null \
    | xargs -0 -r sed -i "s|$python_prefix|/usr/local|g"
  "${build[@]}" -f "$here/bases/python.Containerfile" -t "$python_image" "$ctx" >"$work/logs/base-python.log" 2>&1 \
    || fail "building $python_image"
else
  python_image="docker.io/library/python:3.11-slim-bookworm"
  python_build_args=(--build-arg "PYTHON_IMAGE=python:3.11-slim-bookworm")
  echo "NOTICE: the worker image is built on Debian's Python 3.11 ($python_image):" \
       "no CPython 3.12 build found on this host, or IMAGES_PYTHON=debian"
  "${build[@]}" -f "$here/bases/python-debian.Containerfile" -t "$python_image" "$here/bases" \
    >"$work/logs/base-python.log" 2>&1 || fail "building $python_image"
fi
check_size "$python_image" 100

# === The two images, from the Dockerfiles as they are ===

stage build-operator
logs+=("$work/logs/build-operator.log")
# The release compile runs inside the builder; the Dockerfile's cache mounts keep the cargo registry
# and target directory between builds (under $TMPDIR, so within this work folder). The build context
# is a copy of the worktree's files (tracked and untracked, not ignored) stamped with the current
# time: COPY keeps the files' times, and cargo in the cached target directory would take a source
# edited after the previous build had copied its context, but before it compiled, as up to date.
context="$work/ctx/operator"
rm -rf "$context" && mkdir -p "$context"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
   | tar --null -T - -cf -) | tar -C "$context" --touch -xf -
"${build[@]}" "${ca_mount[@]}" -f "$context/Dockerfile" -t "$operator_image" \
  --build-arg REVISION="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$context" >"$work/logs/build-operator.log" 2>&1 \
  || fail "building $operator_image from Dockerfile"
grep -E '^ *(Compiling celery-operator|Finished)' "$work/logs/build-operator.log" || true
check_size "$operator_image" 5

stage build-worker
logs+=("$work/logs/build-worker.log")
"${build[@]}" "${ca_mount[@]}" -v "$work/pip:/etc/xdg/pip:ro" "${python_build_args[@]}" \
  -f "$root/worker-image/Dockerfile" -t "$worker_image" "$root/worker-image" >"$work/logs/build-worker.log" 2>&1 \
  || fail "building $worker_image from worker-image/Dockerfile"
check_size "$worker_image" 100

# === Smoke tests, as Kubernetes runs the pods (restricted Pod Security Standard) ===

# No --user: the image's USER runs, as in the pods (the chart sets the same uid, the operator's
# worker pods only runAsNonRoot). No --read-only-tmpfs: writable paths are exactly the pods' emptyDirs.
restricted=(--network host --read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges)

start_redis() {  # name password -> sets redis_port
  local name="$1" password="$2" dir="$work/run/$1"
  redis_port=$(free_port)
  rm -rf "$dir" && mkdir -p "$dir"
  redis-server --port "$redis_port" --bind 127.0.0.1 --requirepass "$password" --dir "$dir" --save '' \
    --appendonly no --logfile "$dir/redis.log" &
  pids+=($!)
  logs+=("$dir/redis.log")
  wait_until 30 "redis-server on port $redis_port" redis-cli -p "$redis_port" -a "$password" --no-auth-warning ping
}

stage smoke-operator
password="smoke-$RANDOM$RANDOM"
start_redis operator-redis "$password"
broker="redis://:$password@127.0.0.1:$redis_port/0"

# Who runs, and what it may write.
user=$(podman image inspect --format '{{.Config.User}}' "$operator_image")
[ "${user%%:*}" = 65532 ] || fail "operator image runs as '$user', expected 65532"
out=$(podman run --rm "${restricted[@]}" "$operator_image" --version)
[ "$out" = "celery-operator $version" ] || fail "--version printed '$out', expected 'celery-operator $version'"
echo "--version: $out"
podman run --rm "${restricted[@]}" "$operator_image" crd >"$work/run/crds.yaml"
cat "$root/crds/taskqueues.yaml" "$root/crds/workerpools.yaml" | cmp -s - "$work/run/crds.yaml" \
  || fail "'crd' in the image does not print crds/taskqueues.yaml + crds/workerpools.yaml"
echo "crd: prints crds/ byte for byte"

# check-broker: 0 on a safe broker, 1 on an unsafe one, never the password.
set +e
podman run --rm "${restricted[@]}" "$operator_image" check-broker "$broker" --queue celery >"$work/run/check.txt" 2>&1
safe_status=$?
# allkeys-* is unsafe once a memory limit lets Redis evict (without one it is only a notice).
redis-cli -p "$redis_port" -a "$password" --no-auth-warning config set maxmemory 1gb >/dev/null
redis-cli -p "$redis_port" -a "$password" --no-auth-warning config set maxmemory-policy allkeys-lru >/dev/null
podman run --rm "${restricted[@]}" "$operator_image" check-broker "$broker" --queue celery >"$work/run/check-unsafe.txt" 2>&1
unsafe_status=$?
set -e
logs+=("$work/run/check.txt" "$work/run/check-unsafe.txt")
[ "$safe_status" = 0 ] || fail "check-broker exited $safe_status on a noeviction Redis"
[ "$unsafe_status" = 1 ] || fail "check-broker exited $unsafe_status on an allkeys-lru Redis, expected 1"
grep -q allkeys-lru "$work/run/check-unsafe.txt" || fail "check-broker did not name the eviction policy"
! grep -qF "$password" "$work/run/check.txt" "$work/run/check-unsafe.txt" || fail "check-broker printed the password"
echo "check-broker: exit 0 on noeviction, 1 on allkeys-lru, password never printed"

# run: against the e2e control-plane double over HTTP, with leader election, until /readyz.
logs+=("$work/logs/double.log")
(cd "$root" && cargo build -q -p celery-e2e --example serve) || fail "building the e2e double (cargo build -p celery-e2e --example serve)"
"${CARGO_TARGET_DIR:-$root/target}/debug/examples/serve" none >"$work/logs/double.log" 2>&1 &
pids+=($!)
wait_until 60 "the double's kubeconfig" grep -q '^export KUBECONFIG=' "$work/logs/double.log"
kubeconfig="$(sed -n 's/^export KUBECONFIG=//p' "$work/logs/double.log")"
metrics_port=$(free_port)
containers+=(smoke-operator)
podman run -d --name smoke-operator "${restricted[@]}" -v "$(dirname "$kubeconfig"):/kube:ro" \
  -e KUBECONFIG="/kube/$(basename "$kubeconfig")" -e POD_NAME=smoke-operator -e POD_NAMESPACE=default \
  "$operator_image" run --metrics-addr "127.0.0.1:$metrics_port" --log-format json >/dev/null
wait_until 120 "/readyz of the operator container" curl -fsS "http://127.0.0.1:$metrics_port/readyz"
metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")
grep -q '^celery_operator_autoscaler_decision_seconds_count' <<<"$metrics" || fail "/metrics lacks the operator's metrics"
logged() { podman logs "$1" 2>&1 | grep -- "$2" >/dev/null; }
wait_until 120 "the operator to take the Lease" logged smoke-operator 'acquired the lease'
# The image runs this worktree's code (the leader gauge is recent).
wait_until 30 "celery_operator_leader 1 in /metrics" \
  sh -c "curl -fsS http://127.0.0.1:$metrics_port/metrics | grep -qx 'celery_operator_leader 1'"
podman stop -t 30 smoke-operator >/dev/null
status=$(podman inspect --format '{{.State.ExitCode}}' smoke-operator)
[ "$status" = 0 ] || fail "the operator exited $status on SIGTERM"
logged smoke-operator 'released the lease' || fail "the operator did not release the Lease on SIGTERM"
echo "run: /readyz answered, the Lease was taken (celery_operator_leader 1) and released, exit 0 on SIGTERM"

stage smoke-worker
password="smoke-$RANDOM$RANDOM"
start_redis worker-redis "$password"
celery_env=(-e "CELERY_BROKER_URL=redis://:$password@127.0.0.1:$redis_port/0"
            -e "CELERY_RESULT_BACKEND=redis://:$password@127.0.0.1:$redis_port/1")
user=$(podman image inspect --format '{{.Config.User}}' "$worker_image")
[ "${user%%:*}" = 10001 ] || fail "worker image runs as '$user', expected 10001"
# The worker pod's emptyDirs (operator/src/deployment.rs): the probe directory and /tmp, at the
# pod's paths (/var/run is a link to /run in the image: podman stop warns it cannot find the mount
# at /var/run/celery when it cleans up; harmless).
containers+=(smoke-worker)
podman run -d --name smoke-worker "${restricted[@]}" --tmpfs /var/run/celery:rw,U --tmpfs /tmp:rw,U \
  "${celery_env[@]}" "$worker_image" \
  celery -A celery_example.app worker -Q celery -c 2 -P prefork --prefetch-multiplier 1 \
  --without-mingle --without-gossip -n smoke@%h --loglevel INFO >/dev/null
wait_until 120 "the worker's readiness probe" podman exec smoke-worker celery-probe readiness
podman exec smoke-worker celery-probe liveness >/dev/null || fail "liveness probe failed on a ready worker"
uid=$(podman exec smoke-worker id -u)
[ "$uid" = 10001 ] || fail "the worker runs as uid $uid"
if podman exec smoke-worker sh -c 'touch /app/x' 2>/dev/null; then fail "the root filesystem is writable"; fi
echo "worker: ready and live (celery-probe), uid 10001, root filesystem read-only"

# A client in the same image: send a task and read its result. Then hold a worker slot with the
# example app's `hold` task, stop the worker while it runs, and release the task only once the
# worker has begun its warm shutdown: the container must wait for the task and exit 0.
client() {
  podman run --rm "${restricted[@]}" --tmpfs /tmp:rw,U "${celery_env[@]}" "$worker_image" python -c "$1"
}
sum=$(client 'from celery_example.app import app; print(app.send_task("celery_example.add", (2, 3)).get(timeout=120))')
[ "$sum" = 5 ] || fail "celery_example.add(2, 3) returned '$sum'"
echo "task: celery_example.add(2, 3) = $sum"
# Beat's default schedule store on Redis (worker-image/README.md "Beat schedule") needs redbeat in
# the image; without it beat falls back to the file and forgets its schedule on every rollout.
store=$(client 'import importlib.metadata as m, celery_worker_base.beat_redbeat; print("celery-redbeat", m.version("celery-redbeat"))') \
  || fail "redbeat does not import in $worker_image"
echo "beat store: $store importable"
task_id=$(client 'from celery_example.app import app; print(app.send_task("celery_example.hold", ("smoke",)).id)')
task_state() { client "from celery_example.app import app; print(app.AsyncResult('$1').state)"; }
task_is() { [ "$(task_state "$1")" = "$2" ]; }
wait_until 120 "the hold task to start" task_is "$task_id" STARTED
podman stop -t 120 smoke-worker >/dev/null &
stopping=$!
wait_until 60 "the worker to begin its warm shutdown" logged smoke-worker 'Warm shutdown'
podman exec smoke-worker celery-probe readiness >/dev/null 2>&1 && fail "readiness still passes during the shutdown"
redis-cli -p "$redis_port" -a "$password" --no-auth-warning -n 1 set celery-example:release:smoke 1 >/dev/null
wait "$stopping" || fail "podman stop failed"
status=$(podman inspect --format '{{.State.ExitCode}}' smoke-worker)
[ "$status" = 0 ] || fail "the worker exited $status on SIGTERM"
state=$(task_state "$task_id")
[ "$state" = SUCCESS ] || fail "the task running during the shutdown ended $state"
echo "podman stop: warm shutdown (not ready while draining), the running task finished (SUCCESS), exit 0"

stage sizes
for image in "$operator_image" "$worker_image" "$distroless_image" "$python_image" "$debian_image"; do
  printf '%-55s %6s MB\n' "$image" $(( $(image_size "$image") / 1000 / 1000 ))
done | tee "$work/sizes.txt"
echo
echo "images/test.sh: both images built from the unchanged Dockerfiles and smoke-tested"
