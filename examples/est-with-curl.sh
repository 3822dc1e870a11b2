#!/usr/bin/env bash
# EST (RFC 7030) against a running `zerotouch demo --serve`, with curl and openssl only.
# Usage: examples/est-with-curl.sh [STATE_DIR]   (default: demo-state)
set -euo pipefail
S=${1:-demo-state}
GW=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['gateway'])" "$S/endpoints.json")
CA=$S/gateway/vault/owner-ca.pem
DEV=$S/factory/devices/$(ls "$S/factory/devices" | head -1)
SERIAL=$(basename "$DEV")
WORK=$(mktemp -d)
EST="$GW/.well-known/est"
CURL="curl -sS --fail-with-body --cacert $CA"

echo "== cacerts -> PKCS#7 -> the owner CA"
$CURL "$EST/cacerts" | base64 -d | openssl pkcs7 -inform DER -print_certs > "$WORK/cacerts.pem"
openssl x509 -in "$WORK/cacerts.pem" -noout -subject

echo "== simpleenroll: a CSR made by openssl req, the device's IDevID as TLS client certificate"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$WORK/new.key" \
    -subj "/CN=ignored" -outform DER 2>/dev/null | base64 > "$WORK/new.csr"
$CURL --cert "$DEV/idevid.pem" --key "$DEV/idevid.key" -H "Content-Type: application/pkcs10" \
    --data-binary @"$WORK/new.csr" "$EST/simpleenroll" \
    | base64 -d | openssl pkcs7 -inform DER -print_certs > "$WORK/new.pem"
openssl x509 -in "$WORK/new.pem" -noout -subject -enddate
openssl verify -CAfile "$CA" "$WORK/new.pem"

echo "== simplereenroll: the certificate just issued is the client certificate; same subject"
openssl req -new -key "$WORK/new.key" -subj "/CN=$SERIAL/serialNumber=$SERIAL" -outform DER \
    | base64 > "$WORK/re.csr"
$CURL --cert "$WORK/new.pem" --key "$WORK/new.key" -H "Content-Type: application/pkcs10" \
    --data-binary @"$WORK/re.csr" "$EST/simplereenroll" \
    | base64 -d | openssl pkcs7 -inform DER -print_certs > "$WORK/renewed.pem"
openssl x509 -in "$WORK/renewed.pem" -noout -subject -serial
openssl verify -CAfile "$CA" "$WORK/renewed.pem"

echo "== the CRL"
curl -sS --cacert "$CA" "$GW/crl" | openssl crl -inform DER -noout -lastupdate -nextupdate
rm -rf "$WORK"
