# Builds the `messaging` binary and runs it on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin messaging

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 messaging \
    && mkdir -p /var/lib/messaging && chown messaging /var/lib/messaging
COPY --from=build /src/target/release/messaging /usr/local/bin/messaging
USER messaging
# Without DATABASE_URL the service runs on its embedded SQLite default under ./data: here.
WORKDIR /var/lib/messaging
EXPOSE 8080
ENTRYPOINT ["messaging"]
CMD ["serve"]
