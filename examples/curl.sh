#!/usr/bin/env bash
# curl against service-slm through Envoy: the model list, one answer, a streamed answer, a completion.
# SLM_URL (default http://127.0.0.1:8080), SLM_MODEL and SLM_API_KEY override the defaults.
set -euo pipefail
BASE_URL=${SLM_URL:-http://127.0.0.1:8080}
MODEL=${SLM_MODEL:-gemma-3-270m}
AUTH=()
if [[ -n ${SLM_API_KEY:-} ]]; then AUTH=(-H "authorization: Bearer $SLM_API_KEY"); fi

echo "== models"
curl -fsS "${AUTH[@]}" "$BASE_URL/v1/models"
echo

echo "== chat"
curl -fsS "${AUTH[@]}" "$BASE_URL/v1/chat/completions" -H 'content-type: application/json' -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Name three colours."}],
  "max_tokens": 24, "temperature": 0, "seed": 42
}'
echo

echo "== chat, streamed (server-sent events; -N turns off curl's buffering)"
curl -fsSN "${AUTH[@]}" "$BASE_URL/v1/chat/completions" -H 'content-type: application/json' -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Say hello."}],
  "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}
}'

echo "== completion"
curl -fsS "${AUTH[@]}" "$BASE_URL/v1/completions" -H 'content-type: application/json' -d '{
  "model": "'"$MODEL"'", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0
}'
echo
