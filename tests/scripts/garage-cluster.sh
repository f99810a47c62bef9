#!/bin/sh
# Starts a Garage cluster on loopback for the s3:// tests, or stops one.
#
#   garage-cluster.sh start DIR NODES BASE_PORT   NODES nodes (replication factor NODES),
#                                                 everything below DIR; ports BASE_PORT..+3*NODES
#   garage-cluster.sh stop DIR                    stops every node started in DIR
#
# When started, DIR/env holds the variables a client needs (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, BUCKET) and DIR/nodeN/pid each node's
# process. Ports must lie below the ephemeral range (no outgoing connection takes them first).
# Node folders must start empty: a reused metadata folder keeps its old layout.
set -eu

garage=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
cmd=$1 dir=$2

if [ "$cmd" = stop ]; then
    for pidfile in "$dir"/node*/pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for pidfile in "$dir"/node*/pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    exit 0
fi

nodes=$3 base=$4
secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
region=garage
bucket=qmpbackup-test
mkdir -p "$dir"
for n in $(seq 1 "$nodes"); do
    node="$dir/node$n"
    mkdir -p "$node/meta" "$node/data"
    rpc=$((base + 3 * (n - 1))) s3=$((base + 3 * (n - 1) + 1)) admin=$((base + 3 * (n - 1) + 2))
    cat > "$node/garage.toml" <<EOF
metadata_dir = "$node/meta"
data_dir = "$node/data"
db_engine = "sqlite"
replication_factor = $nodes
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
api_bind_addr = "127.0.0.1:$s3"
s3_region = "$region"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    RUST_LOG=warn "$garage" -c "$node/garage.toml" server > "$node/log" 2>&1 &
    echo $! > "$node/pid"
done

first="$dir/node1/garage.toml"
g() { "$garage" -c "$first" "$@"; }
# Node ids exist once a node has started.
node_id() {
    i=0
    until id=$("$garage" -c "$dir/node$1/garage.toml" node id -q 2>/dev/null); do
        i=$((i + 1))
        [ $i -lt 200 ] || { echo "garage-cluster: node $1 did not start; see $dir/node$1/log" >&2; exit 1; }
        sleep 0.05
    done
    echo "$id"
}
# The first node's id is readable before it listens: wait until the CLI reaches it.
node_id 1 > /dev/null
i=0
until g status > /dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 400 ] || { echo "garage-cluster: node 1 does not answer; see $dir/node1/log" >&2; exit 1; }
    sleep 0.05
done
for n in $(seq 1 "$nodes"); do
    id=$(node_id "$n")
    # A node's id is readable before it listens: retry the connection until it does.
    i=0
    while [ "$n" != 1 ] && ! g node connect "$id" > /dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 400 ] || { echo "garage-cluster: node $n refuses connections; see $dir/node$n/log" >&2; exit 1; }
        sleep 0.05
    done
    g layout assign -z "dc$n" -c 1G "${id%%@*}" > /dev/null
done
g layout apply --version 1 > /dev/null
g bucket create "$bucket" > /dev/null
keys=$(g key create qmpbackup-test)
key_id=$(echo "$keys" | awk '/Key ID/ {print $NF}')
key_secret=$(echo "$keys" | awk '/Secret key/ {print $NF}')
g bucket allow --read --write --owner "$bucket" --key qmpbackup-test > /dev/null

# Serving once the admin API's health check says so.
i=0
until curl -fs "http://127.0.0.1:$((base + 2))/health" > /dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 400 ] || { echo "garage-cluster: not healthy; see $dir/node1/log" >&2; exit 1; }
    sleep 0.05
done
cat > "$dir/env" <<EOF
AWS_ACCESS_KEY_ID=$key_id
AWS_SECRET_ACCESS_KEY=$key_secret
AWS_REGION=$region
AWS_ENDPOINT_URL=http://127.0.0.1:$((base + 1))
BUCKET=$bucket
EOF
cat "$dir/env"
