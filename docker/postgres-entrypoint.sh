#!/bin/sh
# PostgreSQL of the offline stack (docker/compose.offline.yaml), with the official image's contract:
# on first start (empty $PGDATA) create the cluster with superuser $POSTGRES_USER / $POSTGRES_PASSWORD
# and database $POSTGRES_DB; password (scram-sha-256) for every TCP client; then run the server.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: set POSTGRES_PASSWORD (docker/.env)" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != "postgres" ]; then
        # A private socket and no TCP: the healthcheck (pg_isready) cannot see this temporary server.
        init=$(mktemp -d)
        pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k $init" -w start >/dev/null
        createdb -h "$init" -U "$POSTGRES_USER" "$POSTGRES_DB"
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
        rmdir "$init"
    fi
    echo "postgres: cluster created in $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi
exec postgres -D "$PGDATA"
