-- The write side's state, its append-only event store, the outbox the relay drains, and idempotency keys.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL,
    -- argon2id PHC string. Never selected into a response, an event or a log line.
    password_hash text NOT NULL,
    name          text,
    version       bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
-- Case-insensitive uniqueness. A deleted user keeps its email reserved (its events still name it).
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

CREATE TABLE products (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    price_cents bigint NOT NULL CHECK (price_cents >= 0),
    description text,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE orders (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    status       text NOT NULL CHECK (status IN ('placed', 'cancelled')),
    total_cents  bigint NOT NULL CHECK (total_cents >= 0),
    version      bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    cancelled_at timestamptz,
    cancel_reason text
);
CREATE INDEX orders_user_id_idx ON orders (user_id);

CREATE TABLE order_items (
    order_id         uuid NOT NULL REFERENCES orders (id),
    line_no          int NOT NULL,
    product_id       uuid NOT NULL REFERENCES products (id),
    product_name     text NOT NULL,
    unit_price_cents bigint NOT NULL,
    quantity         int NOT NULL CHECK (quantity >= 1),
    line_total_cents bigint NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- Append-only: rows are inserted, never updated or deleted. The source of truth for replay and republish.
CREATE TABLE events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id   uuid NOT NULL,
    version        bigint NOT NULL CHECK (version >= 1),
    type           text NOT NULL,
    schema_version int NOT NULL,
    data           jsonb NOT NULL,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    timestamptz NOT NULL,
    UNIQUE (aggregate_id, version)
);

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only';
END $$;
CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

-- Events not yet acknowledged by Kafka. Written in the same transaction as the event; the relay reads it in
-- position order and deletes rows only after every message of a batch was acknowledged. A transaction that
-- commits late with a low position is still found here, so nothing is skipped.
CREATE TABLE outbox (
    position   bigint PRIMARY KEY REFERENCES events (position),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE idempotency_keys (
    key             text PRIMARY KEY,
    -- sha256 of method, path and body (the password field excluded: it is checked against the user's hash).
    request_hash    text NOT NULL,
    response_status int NOT NULL,
    response_body   jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
