#!/usr/bin/env bash
# Entrypoint of the FedSense image: one image, one role per container.
#
#   pki         create/complete the PKI (/pki) and hand out key material:
#               /dist/server (SuperLink side) and /dist/<site> (one volume per site)
#   superlink   flower-superlink: TLS, SuperNode auth, ServerApp in a separate process
#   register    register every site's public key with the SuperLink (Control API)
#   serverapp   ServerApp runtime (flower-superexec against the SuperLink Runtime API)
#   site SITE   SuperNode + ClientApp runtime for one site; demo data on first start
#   submit      submit the FedProx run and wait for it to finish
#   dashboard   fedsense dashboard of the run in /runs
#   anything else is exec'ed as is (e.g. `fedsense metrics show /runs/x`).
#
# Settings come from FEDSENSE_* variables (defaults below and in docker-compose.yml).
set -euo pipefail

SUPERLINK_PORT="${FEDSENSE_SUPERLINK_PORT:-9092}"
SUPERLINK="${FEDSENSE_SUPERLINK:-superlink:${SUPERLINK_PORT}}"
SITES="${FEDSENSE_SITES:-site-a site-b site-c}"
SERVER_NAMES="${FEDSENSE_SERVER_NAMES:-superlink localhost 127.0.0.1}"
RUNS="${FEDSENSE_RUNS:-/runs}"
RUN_NAME="${FEDSENSE_RUN_NAME:-fedprox-demo}"
HELPERS=/opt/fedsense-docker

log() { echo "[fedsense-entrypoint] $*" >&2; }

# Roles that touch host directories (serverapp: ./runs; an institution's site:
# its data and key files) may be started as root: they then re-exec as the owner
# of that directory, so host files stay owned by the host user (a root-owned
# directory is handed to the image user). Group fedsense is kept to read the
# 0640 server key material. Sets HOME to a private directory of that user.
OWNER_UID="" OWNER_GID=""
adopt_owner_of() {
    local dir="$1"
    mkdir -p "$dir"
    OWNER_UID="$(stat -c %u "$dir")"; OWNER_GID="$(stat -c %g "$dir")"
    if [[ "$OWNER_UID" == 0 ]]; then
        chown fedsense:fedsense "$dir" 2>/dev/null || log "$dir is read-only and root-owned: it must be readable by uid $(id -u fedsense)"
        OWNER_UID="$(id -u fedsense)"; OWNER_GID="$(id -g fedsense)"
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
    if [[ "$(id -u)" == 0 ]]; then
        # Key files mounted from the host may belong to anyone: hand the
        # runtime user private copies (the SuperNode reads them at start only).
        adopt_owner_of /data
        install -d -o "$OWNER_UID" -g "$OWNER_GID" -m 0700 "$HOME/keys"
        install -o "$OWNER_UID" -g "$OWNER_GID" -m 0644 /keys/ca.crt "$HOME/keys/ca.crt"
        install -o "$OWNER_UID" -g "$OWNER_GID" -m 0600 /keys/auth.key "$HOME/keys/auth.key"
        export FEDSENSE_KEYS="$HOME/keys"
        drop_root site "$site" "$@"
    fi
    local keys="${FEDSENSE_KEYS:-/keys}" config
    config="$(python "$HELPERS/prepare_site.py" --site "$site")"
    exec python -m server.supernode --superlink "$SUPERLINK" \
        --root-cert "$keys/ca.crt" --auth-key "$keys/auth.key" --site-config "$config" "$@"
}

role_dashboard() {
    exec fedsense dashboard "$RUNS/$RUN_NAME" --host 0.0.0.0 --port "${FEDSENSE_DASHBOARD_PORT:-8050}" "$@"
}

role="${1:---help}"
[[ $# -gt 0 ]] && shift
case "$role" in
    pki) role_pki "$@" ;;
    superlink) role_superlink "$@" ;;
    register) exec python "$HELPERS/flwr_control.py" register --superlink "$SUPERLINK" --sites "$SITES" "$@" ;;
    serverapp) role_serverapp "$@" ;;
    site) role_site "$@" ;;
    submit) exec python "$HELPERS/flwr_control.py" submit --superlink "$SUPERLINK" --run-dir "$RUNS/$RUN_NAME" "$@" ;;
    dashboard) role_dashboard "$@" ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) exec "$role" "$@" ;;
esac
