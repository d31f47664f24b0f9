#!/usr/bin/env bash
# Fails when a module imports one above it (README, "Design: who owns what"): `kinds` is a leaf;
# nothing but main/up/lab imports the agent; the controllers do not borrow from the scheduler;
# `control` is a toolkit that launches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=0
check() { # <what> <pattern> <paths...>
  local what=$1 pat=$2; shift 2
  local hits
  hits=$(grep -rnE "$pat" "$@" --include=*.rs | grep -vE '^\S+:[0-9]+:\s*//' || true)
  if [ -n "$hits" ]; then echo "layering: $what"; echo "$hits"; bad=1; fi
}
check "kinds imports nothing else of keelson" '(crate|super::super)::' src/kinds
check "only main, up and lab import the agent" '\bagent::' \
  src/api src/scheduler src/controllers src/control src/proxy src/net src/store src/runtime src/stream src/kinds src/tls.rs src/roles.rs
check "the agent and proxy do not import the API server, scheduler or controllers" '(crate::(api|scheduler|controllers|roles)|super::super::(api|scheduler|controllers))\b' src/agent src/proxy
check "the controllers do not import the scheduler" 'scheduler::' src/controllers
check "control is a toolkit: it launches no actor" '(controllers|scheduler|roles)::' src/control
exit $bad
