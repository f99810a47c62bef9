#!/bin/sh
# Makes throw-away X.509 credentials for the TLS tests, in QEMU's tls-creds-x509 layouts:
#   DIR/server/  ca-cert.pem server-cert.pem server-key.pem   (for qmprestore serve)
#   DIR/client/  ca-cert.pem client-cert.pem client-key.pem   (for QEMU's NBD client)
#   DIR/anon/    ca-cert.pem                                  (a client without a certificate)
#   DIR/rogue/   client-cert.pem client-key.pem from another CA
# The server certificate names localhost and 127.0.0.1. EC P-256 keys, valid for two days.
set -eu
dir=$1
mkdir -p "$dir/server" "$dir/client" "$dir/anon" "$dir/rogue" "$dir/work"
cd "$dir/work"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # NAME
    key "$1-key.pem"
    openssl req -x509 -new -key "$1-key.pem" -out "$1-cert.pem" -days 2 -subj "/CN=$1" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
leaf() { # CA NAME EXTENSIONS
    key "$2-key.pem"
    openssl req -new -key "$2-key.pem" -out "$2.csr" -subj "/CN=$2"
    printf '%s\n' "$3" > "$2.ext"
    openssl x509 -req -in "$2.csr" -CA "$1-cert.pem" -CAkey "$1-key.pem" -CAcreateserial \
        -out "$2-cert.pem" -days 2 -extfile "$2.ext" 2>/dev/null
}
ca test-ca
ca rogue-ca
leaf test-ca server "subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
leaf test-ca client "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
leaf rogue-ca rogue "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
for d in server client anon; do cp test-ca-cert.pem "$dir/$d/ca-cert.pem"; done
cp server-cert.pem server-key.pem "$dir/server/"
cp client-cert.pem client-key.pem "$dir/client/"
cp rogue-cert.pem "$dir/rogue/client-cert.pem"
cp rogue-key.pem "$dir/rogue/client-key.pem"
cp test-ca-cert.pem "$dir/rogue/ca-cert.pem"
