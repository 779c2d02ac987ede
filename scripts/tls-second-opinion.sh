#!/usr/bin/env bash
# A second opinion on our TLS configuration, next to the sslyze gate in the test suite: start
# spam-killer with a STARTTLS listener on 127.0.0.1 and scan it with Debian's testssl.sh. It never
# fails the build (testssl.sh is slow and opinionated): it prints the lines testssl.sh marks
# "NOT ok" or "VULNERABLE" for a person to read. Three are expected: no server cipher order (the
# Mozilla intermediate profile leaves the choice to the client), and a self-signed chain without
# a CRL/OCSP URL (the certificate is the first-run self-signed one).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 0
command -v testssl >/dev/null || { echo "tls-second-opinion: testssl.sh not installed; skipped"; exit 0; }
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
port="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$work/c.yaml" <<YAML
hostname: mx.second-opinion.test
domains: [second-opinion.test]
listeners: [{name: mx, address: 127.0.0.1, port: $port, tls: starttls}]
dev_upstream: {enabled: false}
data_dir: $work/data
YAML
.venv/bin/spam-killer run -c "$work/c.yaml" >"$work/mx.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
echo "tls-second-opinion: testssl.sh --starttls smtp 127.0.0.1:$port (lines marked NOT ok or VULNERABLE)"
report="$(timeout 180 testssl --quiet --color 0 --warnings off --starttls smtp \
    --protocols --server-defaults --server-preference --vulnerable "127.0.0.1:$port" 2>&1)"
grep -E "NOT ok|VULNERABLE" <<<"$report" || echo "tls-second-opinion: nothing marked"
exit 0
