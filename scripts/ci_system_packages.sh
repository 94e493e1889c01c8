#!/usr/bin/env bash
# System packages the tests need: a PostgreSQL server (the feedback store's second backend) and
# chromium (the browser test). Idempotent: returns at once when both are installed.
set -euo pipefail
need=()
dpkg -s postgresql >/dev/null 2>&1 || need+=(postgresql)
dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
