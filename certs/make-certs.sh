#!/usr/bin/env bash
# Makes the development and test certificates of this repository, and only those:
#   ca.crt/.key              a local CA ("erpgate dev CA")
#   localhost.crt/.key       server: localhost, 127.0.0.1, ::1 (the default certificate)
#   erp-test.crt/.key        server: erp.test
#   wild-test.crt/.key       server: *.wild.test
#   client.crt/.key          client certificate from ca.crt (an integration partner)
#   other-ca.crt, other-client.crt/.key   a client certificate from another CA (refused)
# They are for tests and local runs only: never use them, or commit any other key, for a
# real deployment. Run from anywhere: ./certs/make-certs.sh (needs the openssl command).
set -euo pipefail
cd "$(dirname "$0")"
days=3650
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
ca() { # name, subject
  key "$1"
  openssl req -x509 -new -key "$1.key" -sha256 -days "$days" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$1.crt"
}
leaf() { # name, ca, CN, extendedKeyUsage, subjectAltName (or empty)
  key "$1"
  local ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$4"
    [ -n "$5" ] && echo "subjectAltName=$5"
  } >"$ext"
  openssl req -new -key "$1.key" -subj "/CN=$3" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -sha256 \
    -days "$days" -extfile "$ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$ext"
}
ca ca "erpgate dev CA"
leaf localhost ca localhost serverAuth "DNS:localhost,IP:127.0.0.1,IP:::1"
leaf erp-test ca erp.test serverAuth "DNS:erp.test"
leaf wild-test ca "*.wild.test" serverAuth "DNS:*.wild.test"
leaf client ca "bank-link" clientAuth ""
ca other-ca "some other CA"
leaf other-client other-ca "stranger" clientAuth ""
rm -f ./*.srl other-ca.key
echo "made: $(ls ./*.crt | tr '\n' ' ')"
