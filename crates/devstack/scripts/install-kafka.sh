#!/usr/bin/env bash
# Resolves the Apache Kafka broker jars from Maven Central into the cache (idempotent).
here="$(cd "$(dirname "$0")" && pwd)"; . "$here/common.sh"
libs="$CQRS_CACHE/kafka-$KAFKA_VERSION/libs"
marker="$(done_marker kafka-$KAFKA_VERSION)"
if [[ -f "$marker" ]]; then echo "$libs"; exit 0; fi
command -v java >/dev/null || { log "installing JDK 17"; apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; }
command -v mvn >/dev/null || { log "installing maven"; apt-get update -qq && apt-get install -y -qq maven; }
log "resolving Kafka $KAFKA_VERSION jars from Maven Central"
rm -rf "$libs"; mkdir -p "$libs"
mvn -B -q -f "$here/../kafka/pom.xml" \
  org.apache.maven.plugins:maven-dependency-plugin:3.11.0:copy-dependencies \
  -DoutputDirectory="$libs" -DincludeScope=runtime >&2
touch "$marker"; echo "$libs"
