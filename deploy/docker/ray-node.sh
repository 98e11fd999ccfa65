#!/bin/sh
# Ray bootstrap for multi-node serving, one process per pod of a LeaderWorkerSet group.
#
#   ftp-vllm-ray-node leader [vLLM server flags...]
#       start the Ray head, wait until the whole group has joined, then exec
#       `ftp-vllm serve --distributed-executor-backend ray [flags...]`
#   ftp-vllm-ray-node worker
#       wait for the leader's Ray head, join it and block (the pod lives as long as Ray does)
#
# Environment: LWS_LEADER_ADDRESS and LWS_GROUP_SIZE (set by the LeaderWorkerSet controller),
# FTP_RAY_PORT (6379), FTP_RAY_WAIT_S (seconds to wait for the group or the head, 900),
# FTP_RAY_POLL_S (seconds between checks, 5).
set -eu

role="${1:-}"
if [ "$#" -gt 0 ]; then shift; fi
port="${FTP_RAY_PORT:-6379}"
wait_s="${FTP_RAY_WAIT_S:-900}"
poll_s="${FTP_RAY_POLL_S:-5}"
deadline=$(( $(date +%s) + wait_s ))

alive_nodes() {
    python3 - <<'PY' 2>/dev/null || echo 0
import ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
print(sum(1 for node in ray.nodes() if node.get("Alive")))
PY
}

case "$role" in
    leader)
        size="${LWS_GROUP_SIZE:?LWS_GROUP_SIZE is not set: run under a LeaderWorkerSet or export it}"
        ray start --head --port="$port" --disable-usage-stats
        while :; do
            n="$(alive_nodes)"
            if [ "$n" -ge "$size" ]; then
                break
            fi
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "ftp-vllm-ray-node: only $n of $size Ray nodes joined within ${wait_s}s" >&2
                exit 1
            fi
            echo "ftp-vllm-ray-node: waiting for Ray nodes ($n of $size)"
            sleep "$poll_s"
        done
        exec ftp-vllm serve --distributed-executor-backend ray "$@"
        ;;
    worker)
        leader="${LWS_LEADER_ADDRESS:?LWS_LEADER_ADDRESS is not set: run under a LeaderWorkerSet or export it}"
        until ray health-check --address "$leader:$port" >/dev/null 2>&1; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "ftp-vllm-ray-node: Ray head $leader:$port not reachable within ${wait_s}s" >&2
                exit 1
            fi
            echo "ftp-vllm-ray-node: waiting for the Ray head at $leader:$port"
            sleep "$poll_s"
        done
        exec ray start --address="$leader:$port" --block --disable-usage-stats
        ;;
    *)
        echo "usage: ftp-vllm-ray-node leader [vLLM server flags...] | worker" >&2
        exit 2
        ;;
esac
