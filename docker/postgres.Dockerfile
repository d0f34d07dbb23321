# PostgreSQL from Debian's packages, for machines that cannot pull the official image
# (docker/compose.offline.yaml): the same contract as postgres:16-bookworm in docker/compose.yaml
# (POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, data in /var/lib/postgresql/data, pg_isready on
# the PATH), on any Debian bookworm base. A file of its own: Compose v1's classic builder would build
# every stage of docker/Dockerfile before this one. Debian's extra CA option does not apply: apt
# fetches over plain HTTP and verifies signatures.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# No default cluster: the entrypoint creates one in $PGDATA on first start.
RUN set -eu; mkdir -p /etc/postgresql-common; echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
    apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/*; \
    ln -s /usr/lib/postgresql/15/bin /usr/local/lib/pgbin; \
    mkdir -p /var/lib/postgresql/data && chown postgres:postgres /var/lib/postgresql/data && chmod 700 /var/lib/postgresql/data
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/local/lib/pgbin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
