#!/usr/bin/env bash
# Entrypoint of the FedSense image: one image, one role per container.
#
#   pki         create/complete the PKI (/pki) and hand out key material:
#               /dist/server (SuperLink side) and /dist/<site> (one volume per site)
#   operator N  issue operator N's client certificate; prints it and its key (PEM) on stdout
#   superlink   flower-superlink: TLS, SuperNode auth, ServerApp in a separate process
#   frontdoor   nginx: the only published endpoint; Fleet API for all, Control API for operators
#   register    register every site's public key with the SuperLink (Control API)
#   serverapp   ServerApp runtime (flower-superexec against the SuperLink Runtime API)
#   demo-data   write demo data into each empty site volume under /seed/<site> (one-shot)
#   site SITE   SuperNode + ClientApp runtime for one site (non-root, data read-only)
#   submit      submit the FedProx run and wait for it to finish
#   dashboard   fedsense dashboard of the run in /runs (token in /state, printed once)
#   anything else is exec'ed as is (e.g. `fedsense metrics show /runs/x`).
#
# Settings come from FEDSENSE_* variables (defaults below and in docker-compose.yml).
set -euo pipefail

SUPERLINK_PORT="${FEDSENSE_SUPERLINK_PORT:-9092}"
SUPERLINK="${FEDSENSE_SUPERLINK:-superlink:${SUPERLINK_PORT}}"
SITES="${FEDSENSE_SITES:-site-a site-b site-c}"
SERVER_NAMES="${FEDSENSE_SERVER_NAMES:-frontdoor superlink localhost 127.0.0.1}"
FRONTDOOR_PORT="${FEDSENSE_FRONTDOOR_PORT:-9443}"
RUNS="${FEDSENSE_RUNS:-/runs}"
RUN_NAME="${FEDSENSE_RUN_NAME:-compose-fedprox}"
HELPERS=/opt/fedsense-docker

log() { echo "[fedsense-entrypoint] $*" >&2; }

# The serverapp role writes a host directory (./runs) and may be started as root:
# it then re-exec's as the owner of that directory, so host files stay owned by
# the host user (a root-owned directory is handed to the image user). Group fedsense is kept to read the
# 0640 server key material. Sets HOME to a private directory of that user.
OWNER_UID="" OWNER_GID=""
adopt_owner_of() {
    local dir="$1"
    mkdir -p "$dir"
    OWNER_UID="$(stat -c %u "$dir")"; OWNER_GID="$(stat -c %g "$dir")"
    if [[ "$OWNER_UID" == 0 ]]; then
        # Docker created it (it did not exist on the host): hand it to the invoking host user when compose
        # passed FEDSENSE_HOST_UID/GID (Makefile `compose-up`), else to the image user.
        local uid="${FEDSENSE_HOST_UID:-}" gid="${FEDSENSE_HOST_GID:-}"
        [[ "$uid" =~ ^[1-9][0-9]*$ && "$gid" =~ ^[0-9]+$ ]] || { uid="$(id -u fedsense)"; gid="$(id -g fedsense)"; }
        chown "$uid:$gid" "$dir" 2>/dev/null || log "$dir is read-only and root-owned: it must be readable by uid $uid"
        OWNER_UID="$uid"; OWNER_GID="$gid"
    fi
    export HOME="/tmp/fedsense-home-$OWNER_UID" FLWR_HOME="/tmp/fedsense-home-$OWNER_UID/.flwr"
    install -d -o "$OWNER_UID" -g "$OWNER_GID" -m 0700 "$HOME"
}

drop_root() {
    log "dropping root: running as uid $OWNER_UID"
    exec setpriv --reuid="$OWNER_UID" --regid="$OWNER_GID" --groups="$(id -g fedsense)" --no-new-privs \
        --inh-caps=-all --bounding-set=-all "$0" "$@"
}

# Copy only when different, so restarts leave files (and mtimes) alone.
install_if_changed() {
    local mode="$1" src="$2" dst="$3"
    cmp -s "$src" "$dst" 2>/dev/null || install -m "$mode" "$src" "$dst"
}

role_pki() {
    [[ "$(id -u)" == 0 ]] || { log "pki runs as root (it hands files to other users)"; exit 1; }
    local args=(--out /pki) name site
    for name in $SERVER_NAMES; do args+=(--server-name "$name"); done
    for site in $SITES; do args+=(--site "$site"); done
    python -m server.pki "${args[@]}"
    # The SuperLink side gets no CA key; each site gets only its own private key.
    # Server secrets are group-readable: the ServerApp runtime may run as the
    # host user (see adopt_owner_of) with group fedsense.
    install -d -m 0750 /dist/server/sites
    install_if_changed 0644 /pki/ca.crt /dist/server/ca.crt
    install_if_changed 0644 /pki/server.crt /dist/server/server.crt
    install_if_changed 0600 /pki/server.key /dist/server/server.key
    install_if_changed 0640 /pki/superexec.secret /dist/server/superexec.secret
    for site in $SITES; do
        install_if_changed 0644 "/pki/sites/$site.pub" "/dist/server/sites/$site.pub"
        if [[ -d "/dist/$site" ]]; then
            install_if_changed 0644 /pki/ca.crt "/dist/$site/ca.crt"
            install_if_changed 0600 "/pki/sites/$site.key" "/dist/$site/auth.key"
            install_if_changed 0644 "/pki/sites/$site.pub" "/dist/$site/auth.pub"
        fi
    done
    chown -R fedsense:fedsense /pki /dist
    log "key material handed out under /dist: server ${SITES}"
}

role_superlink() {
    exec flower-superlink \
        --ssl-ca-certfile /keys/ca.crt --ssl-certfile /keys/server.crt --ssl-keyfile /keys/server.key \
        --enable-supernode-auth \
        --isolation process --superexec-auth-secret-file /keys/superexec.secret \
        --host 0.0.0.0 --port "$SUPERLINK_PORT" \
        --database /state/superlink.db \
        --disable-runtime-dependency-installation "$@"
}

role_serverapp() {
    if [[ "$(id -u)" == 0 ]]; then
        adopt_owner_of "$RUNS"
        drop_root serverapp "$@"
    fi
    exec flower-superexec --runtime-api-address "$SUPERLINK" \
        --root-certificates /keys/ca.crt --superexec-auth-secret-file /keys/superexec.secret "$@"
}

role_site() {
    local site="${1:?usage: site SITE-NAME}"; shift
    # A site never runs as root and never changes its data: /data is mounted read-only and read as
    # the user the container runs as (compose `user:`), who must be able to read it and /keys.
    if [[ "$(id -u)" == 0 ]]; then
        log "a site does not run as root: set the container's user to one that can read /data and /keys"
        log "(deploy/site/docker-compose.yml: FEDSENSE_USER=\$(id -u):\$(id -g))"
        exit 1
    fi
    if [[ ! -w "$HOME" ]]; then
        export HOME="/tmp/fedsense-home-$(id -u)" FLWR_HOME="/tmp/fedsense-home-$(id -u)/.flwr"
        mkdir -p -m 0700 "$HOME"
    fi
    local config metrics=()
    config="$(python "$HELPERS/prepare_site.py" --site "$site")"
    # The site's own /metrics (counts and times only), on the container's networks; never published.
    [[ -n "${FEDSENSE_SITE_METRICS_PORT:-}" ]] && metrics=(--metrics-port "$FEDSENSE_SITE_METRICS_PORT" --metrics-host 0.0.0.0)
    exec python -m client.supernode --superlink "$SUPERLINK" \
        --root-cert /keys/ca.crt --auth-key /keys/auth.key --site-config "$config" "${metrics[@]}" "$@"
}

role_demo_data() {
    # One-shot, demo only: the site volumes are mounted here read-write (under /seed/<site>) so that
    # the site containers can mount them read-only.
    local site
    for site in $SITES; do
        python "$HELPERS/prepare_site.py" --site "$site" --data "/seed/$site" --generate-demo \
            --out "/tmp/seed-$site.toml" >/dev/null
    done
}

role_operator() {
    local name="${1:?usage: operator NAME}"
    [[ "$(id -u)" == 0 ]] || { log "operator runs as root (it reads the CA key in /pki)"; exit 1; }
    python -m server.pki --out /pki --operator "$name" >&2
    cat "/pki/operators/$name.crt" "/pki/operators/$name.key"
}

role_frontdoor() {
    local conf=/tmp/nginx/nginx.conf
    mkdir -p /tmp/nginx
    sed -e "s|@UPSTREAM@|${SUPERLINK}|g" -e "s|@PORT@|${FRONTDOOR_PORT}|g" \
        "$HELPERS/nginx.conf.template" >"$conf"
    nginx -t -c "$conf" -e stderr
    exec nginx -c "$conf" -e stderr -g 'daemon off;'
}

role_dashboard() {
    # Published (compose maps it to 127.0.0.1 by default): a token, created and printed at first start.
    # FEDSENSE_DASHBOARD_METRICS_PORT: the run's gauges alone, tokenless, for Prometheus (never published).
    local metrics=()
    [[ -n "${FEDSENSE_DASHBOARD_METRICS_PORT:-}" ]] && metrics=(--metrics-port "$FEDSENSE_DASHBOARD_METRICS_PORT" --metrics-host 0.0.0.0)
    exec fedsense dashboard "$RUNS/$RUN_NAME" --wait --host 0.0.0.0 --port "${FEDSENSE_DASHBOARD_PORT:-8050}" \
        --token-file "${FEDSENSE_DASHBOARD_TOKEN_FILE:-/state/dashboard.token}" "${metrics[@]}" "$@"
}

role="${1:---help}"
[[ $# -gt 0 ]] && shift
case "$role" in
    pki) role_pki "$@" ;;
    operator) role_operator "$@" ;;
    superlink) role_superlink "$@" ;;
    frontdoor) role_frontdoor "$@" ;;
    demo-data) role_demo_data "$@" ;;
    register) exec python "$HELPERS/flwr_control.py" register --superlink "$SUPERLINK" --sites "$SITES" "$@" ;;
    serverapp) role_serverapp "$@" ;;
    site) role_site "$@" ;;
    submit) exec python "$HELPERS/flwr_control.py" submit --superlink "$SUPERLINK" --run-dir "$RUNS/$RUN_NAME" "$@" ;;
    dashboard) role_dashboard "$@" ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) exec "$role" "$@" ;;
esac
