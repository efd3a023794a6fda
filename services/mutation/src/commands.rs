//! Commands and how each one is written: state rows, the event and its outbox row, inside the caller's
//! transaction. Expected refusals (missing, version mismatch, duplicate email, unknown references) are detected
//! by reading rows, not by raising errors, so one refused command never aborts the shared transaction of a
//! group commit.

use std::collections::{HashMap, HashSet};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use cqrs_common::{FieldError, Problem};
use cqrs_events::{
    Envelope, EventPayload, OrderCancelled, OrderCreated, OrderItem, OrderUser, ProductCreated,
    ProductDeleted, ProductUpdated, UserCreated, UserDeleted, UserUpdated,
};
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::domain::{Email, PriceCents, format_cents};

/// Where a command came from; stored in the event's metadata and envelope.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub trace_id: Option<String>,
    pub causation_id: Option<String>,
}

/// A validated command. Password hashes are computed before a command is built; the hash only travels to the
/// `users` row.
pub enum Command {
    CreateUser {
        id: Uuid,
        email: Email,
        password_hash: String,
        name: Option<String>,
    },
    UpdateUser {
        id: Uuid,
        expected: Option<i64>,
        email: Option<Email>,
        name: Option<Option<String>>,
        password_hash: Option<String>,
    },
    DeleteUser {
        id: Uuid,
        expected: Option<i64>,
    },
    CreateProduct {
        id: Uuid,
        name: String,
        price: PriceCents,
        description: Option<String>,
    },
    UpdateProduct {
        id: Uuid,
        expected: Option<i64>,
        name: Option<String>,
        price: Option<PriceCents>,
        description: Option<Option<String>>,
    },
    DeleteProduct {
        id: Uuid,
        expected: Option<i64>,
    },
    CreateOrder {
        id: Uuid,
        user_id: Uuid,
        items: Vec<(Uuid, u32)>,
    },
    CancelOrder {
        id: Uuid,
        expected: Option<i64>,
        reason: Option<String>,
    },
}

impl std::fmt::Debug for Command {
    // Hand-written so a password hash can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Command::{}", self.kind())
    }
}

impl Command {
    /// The metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateUser { .. } => "create_user",
            Command::UpdateUser { .. } => "update_user",
            Command::DeleteUser { .. } => "delete_user",
            Command::CreateProduct { .. } => "create_product",
            Command::UpdateProduct { .. } => "update_product",
            Command::DeleteProduct { .. } => "delete_product",
            Command::CreateOrder { .. } => "create_order",
            Command::CancelOrder { .. } => "cancel_order",
        }
    }
}

/// A successful command's answer.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: StatusCode,
    pub body: Value,
    pub version: i64,
}

/// Why a command was refused (or could not run). One error type for the command boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: Uuid },
    #[error("version mismatch: If-Match expected {expected}, current version is {current}")]
    VersionMismatch { expected: i64, current: i64 },
    #[error("a user with this email already exists")]
    DuplicateEmail,
    #[error("invalid command")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    Conflict(String),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl CommandError {
    pub fn outcome(&self) -> &'static str {
        match self {
            CommandError::NotFound { .. } => "not_found",
            CommandError::VersionMismatch { .. } => "version_mismatch",
            CommandError::DuplicateEmail => "duplicate",
            CommandError::Invalid(_) => "invalid",
            CommandError::Conflict(_) => "conflict",
            CommandError::IdempotencyMismatch => "idempotency_mismatch",
            CommandError::Unavailable(_) => "unavailable",
            CommandError::Internal(_) => "error",
        }
    }

    pub fn to_problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            CommandError::NotFound { .. } => Problem::not_found(detail),
            CommandError::VersionMismatch { .. } => {
                Problem::new(StatusCode::PRECONDITION_FAILED, "version-mismatch", detail)
            }
            CommandError::DuplicateEmail => {
                Problem::new(StatusCode::CONFLICT, "duplicate-email", detail).with_errors(vec![
                    FieldError {
                        field: "email".into(),
                        message: "is already registered".into(),
                    },
                ])
            }
            CommandError::Invalid(errors) => Problem::unprocessable(
                "the request has invalid or unknown values; see errors",
                errors.clone(),
            ),
            CommandError::Conflict(_) => Problem::new(StatusCode::CONFLICT, "conflict", detail),
            CommandError::IdempotencyMismatch => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                detail,
            ),
            CommandError::Unavailable(_) => Problem::unavailable(detail, 1),
            CommandError::Internal(_) => Problem::internal(detail),
        }
    }
}

/// What went wrong while executing: a refusal (the transaction is still usable) or a database error (the
/// transaction is aborted).
#[derive(Debug)]
pub enum ExecError {
    Rejected(CommandError),
    Db(sqlx::Error),
}

impl From<sqlx::Error> for ExecError {
    fn from(e: sqlx::Error) -> Self {
        ExecError::Db(e)
    }
}

impl From<CommandError> for ExecError {
    fn from(e: CommandError) -> Self {
        ExecError::Rejected(e)
    }
}

type Exec<T> = Result<T, ExecError>;

/// The columns of one `events` row.
struct EventRow {
    id: Uuid,
    aggregate_type: &'static str,
    aggregate_id: Uuid,
    version: i64,
    event_type: &'static str,
    schema_version: i32,
    data: Value,
    metadata: Value,
    occurred_at: DateTime<Utc>,
}

impl EventRow {
    fn new(aggregate_id: Uuid, version: i64, payload: EventPayload, meta: &Meta) -> Self {
        let mut env = Envelope::new(aggregate_id, u64::try_from(version).unwrap_or(1), payload);
        env.trace_id = meta.trace_id.clone();
        env.causation_id = meta.causation_id.clone();
        let data = serde_json::to_value(&env.payload)
            .ok()
            .and_then(|mut v| v.get_mut("data").map(Value::take))
            .unwrap_or_else(|| json!({}));
        let mut metadata = serde_json::Map::new();
        if let Some(t) = &env.trace_id {
            metadata.insert("traceId".into(), json!(t));
        }
        if let Some(c) = &env.causation_id {
            metadata.insert("causationId".into(), json!(c));
        }
        Self {
            id: env.id,
            aggregate_type: env.aggregate_type.as_str(),
            aggregate_id,
            version,
            event_type: env.event_type().as_str(),
            schema_version: i32::try_from(env.schema_version).unwrap_or(1),
            data,
            metadata: Value::Object(metadata),
            occurred_at: env.occurred_at,
        }
    }
}

/// `$1..$9` of every statement that appends an event: the event row's columns.
macro_rules! with_event {
    ($sql:expr, $ev:expr) => {
        sqlx::query($sql)
            .bind($ev.id)
            .bind($ev.aggregate_type)
            .bind($ev.aggregate_id)
            .bind($ev.version)
            .bind($ev.event_type)
            .bind($ev.schema_version)
            .bind(&$ev.data)
            .bind(&$ev.metadata)
            .bind($ev.occurred_at)
    };
}

/// `<state change CTE>` followed by the standard tail: the event row ($1–$9, bound by `with_event!`) and its
/// outbox row, all in one statement.
macro_rules! append_event_sql {
    ($state:literal) => {
        concat!(
            $state,
            ",
         e AS (
            INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, metadata, occurred_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING position)
         INSERT INTO outbox (position) SELECT position FROM e"
        )
    };
}

/// Runs one command in the caller's transaction.
pub async fn execute(conn: &mut PgConnection, cmd: &Command, meta: &Meta) -> Exec<Outcome> {
    match cmd {
        Command::CreateUser {
            id,
            email,
            password_hash,
            name,
        } => create_user(conn, *id, email, password_hash, name.as_deref(), meta).await,
        Command::UpdateUser {
            id,
            expected,
            email,
            name,
            password_hash,
        } => {
            update_user(
                conn,
                *id,
                *expected,
                email.as_ref(),
                name.as_ref(),
                password_hash.as_deref(),
                meta,
            )
            .await
        }
        Command::DeleteUser { id, expected } => delete_user(conn, *id, *expected, meta).await,
        Command::CreateProduct {
            id,
            name,
            price,
            description,
        } => create_product(conn, *id, name, *price, description.as_deref(), meta).await,
        Command::UpdateProduct {
            id,
            expected,
            name,
            price,
            description,
        } => {
            update_product(
                conn,
                *id,
                *expected,
                name.as_deref(),
                *price,
                description.as_ref(),
                meta,
            )
            .await
        }
        Command::DeleteProduct { id, expected } => delete_product(conn, *id, *expected, meta).await,
        Command::CreateOrder { id, user_id, items } => {
            create_order(conn, *id, *user_id, items, meta).await
        }
        Command::CancelOrder {
            id,
            expected,
            reason,
        } => cancel_order(conn, *id, *expected, reason.as_deref(), meta).await,
    }
}

fn check_version(expected: Option<i64>, current: i64) -> Result<(), CommandError> {
    match expected {
        Some(e) if e != current => Err(CommandError::VersionMismatch {
            expected: e,
            current,
        }),
        _ => Ok(()),
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn user_json(
    id: Uuid,
    email: &str,
    name: Option<&str>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
) -> Value {
    let mut v = json!({
        "id": id, "email": email, "name": name, "version": version,
        "createdAt": ts(created_at), "updatedAt": ts(updated_at),
    });
    if let Some(d) = deleted_at {
        v["deletedAt"] = json!(ts(d));
    }
    v
}

fn product_json(
    id: Uuid,
    name: &str,
    price_cents: i64,
    description: Option<&str>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
) -> Value {
    let mut v = json!({
        "id": id, "name": name, "price": format_cents(price_cents), "priceCents": price_cents,
        "description": description, "version": version,
        "createdAt": ts(created_at), "updatedAt": ts(updated_at),
    });
    if let Some(d) = deleted_at {
        v["deletedAt"] = json!(ts(d));
    }
    v
}

async fn create_user(
    conn: &mut PgConnection,
    id: Uuid,
    email: &Email,
    password_hash: &str,
    name: Option<&str>,
    meta: &Meta,
) -> Exec<Outcome> {
    let ev = EventRow::new(
        id,
        1,
        EventPayload::UserCreated(UserCreated {
            email: email.as_str().to_owned(),
            name: name.map(str::to_owned),
        }),
        meta,
    );
    // One round trip; a duplicate email inserts nothing (and appends nothing) instead of raising.
    let row = with_event!(
        "WITH u AS (
            INSERT INTO users (id, email, password_hash, name, version, created_at, updated_at)
            VALUES ($3, $10, $11, $12, 1, $9, $9)
            ON CONFLICT ((lower(email))) DO NOTHING
            RETURNING id),
         e AS (
            INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, metadata, occurred_at)
            SELECT $1, $2, u.id, $4, $5, $6, $7, $8, $9 FROM u
            RETURNING position)
         INSERT INTO outbox (position) SELECT position FROM e RETURNING position",
        ev
    )
    .bind(email.as_str())
    .bind(password_hash)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    if row.is_none() {
        return Err(CommandError::DuplicateEmail.into());
    }
    Ok(Outcome {
        status: StatusCode::CREATED,
        body: user_json(
            id,
            email.as_str(),
            name,
            1,
            ev.occurred_at,
            ev.occurred_at,
            None,
        ),
        version: 1,
    })
}

/// A user creation as [`create_users`] takes it.
pub struct NewUser<'a> {
    pub id: Uuid,
    pub email: &'a Email,
    pub password_hash: &'a str,
    pub name: Option<&'a str>,
    pub meta: &'a Meta,
}

/// Many user creations in ONE statement, like [`create_products`]. An email that is already registered (or
/// taken by an earlier user of the same batch: rows are inserted in the order given) inserts nothing and
/// appends nothing; its entry is `Err(DuplicateEmail)`, exactly as if the commands had run one by one.
pub async fn create_users(
    conn: &mut PgConnection,
    items: &[NewUser<'_>],
) -> Exec<Vec<Result<Outcome, CommandError>>> {
    let evs: Vec<EventRow> = items
        .iter()
        .map(|u| {
            EventRow::new(
                u.id,
                1,
                EventPayload::UserCreated(UserCreated {
                    email: u.email.as_str().to_owned(),
                    name: u.name.map(str::to_owned),
                }),
                u.meta,
            )
        })
        .collect();
    if evs.is_empty() {
        return Ok(Vec::new());
    }
    let query = sqlx::query(
        "WITH t AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::uuid[],
                                 $10::jsonb[], $11::jsonb[])
                   WITH ORDINALITY AS t(id, email, hash, name, at, event_id, data, metadata, n)),
         u AS (
            INSERT INTO users (id, email, password_hash, name, version, created_at, updated_at)
            SELECT t.id, t.email, t.hash, t.name, 1, t.at, t.at FROM t ORDER BY t.n
            ON CONFLICT ((lower(email))) DO NOTHING
            RETURNING id),
         e AS (
            INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, metadata, occurred_at)
            SELECT t.event_id, $7, t.id, 1, $8, $9, t.data, t.metadata, t.at FROM t JOIN u ON u.id = t.id
            ORDER BY t.n
            RETURNING position),
         o AS (INSERT INTO outbox (position) SELECT position FROM e)
         SELECT id FROM u",
    )
    .bind(items.iter().map(|u| u.id).collect::<Vec<_>>())
    .bind(items.iter().map(|u| u.email.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|u| u.password_hash).collect::<Vec<_>>())
    .bind(items.iter().map(|u| u.name).collect::<Vec<_>>());
    let created = bind_events(query, &evs.iter().collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get::<Uuid, _>("id"))
        .collect::<Result<HashSet<Uuid>, _>>()?;
    Ok(items
        .iter()
        .zip(&evs)
        .map(|(u, ev)| {
            if !created.contains(&u.id) {
                return Err(CommandError::DuplicateEmail);
            }
            Ok(Outcome {
                status: StatusCode::CREATED,
                body: user_json(
                    u.id,
                    u.email.as_str(),
                    u.name,
                    1,
                    ev.occurred_at,
                    ev.occurred_at,
                    None,
                ),
                version: 1,
            })
        })
        .collect())
}

struct UserRow {
    email: String,
    name: Option<String>,
    version: i64,
    created_at: DateTime<Utc>,
}

async fn lock_user(conn: &mut PgConnection, id: Uuid, expected: Option<i64>) -> Exec<UserRow> {
    let row = sqlx::query(
        "SELECT email, name, version, created_at FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(CommandError::NotFound { entity: "user", id })?;
    let u = UserRow {
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
    };
    check_version(expected, u.version)?;
    Ok(u)
}

async fn update_user(
    conn: &mut PgConnection,
    id: Uuid,
    expected: Option<i64>,
    email: Option<&Email>,
    name: Option<&Option<String>>,
    password_hash: Option<&str>,
    meta: &Meta,
) -> Exec<Outcome> {
    let u = lock_user(conn, id, expected).await?;
    let new_email = email
        .map(|e| e.as_str().to_owned())
        .unwrap_or(u.email.clone());
    let new_name = match name {
        Some(n) => n.clone(),
        None => u.name.clone(),
    };
    if new_email.to_lowercase() != u.email.to_lowercase() {
        let taken = sqlx::query("SELECT 1 FROM users WHERE lower(email) = lower($1) AND id <> $2")
            .bind(&new_email)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        if taken.is_some() {
            return Err(CommandError::DuplicateEmail.into());
        }
    }
    let version = u.version + 1;
    let ev = EventRow::new(
        id,
        version,
        EventPayload::UserUpdated(UserUpdated {
            email: new_email.clone(),
            name: new_name.clone(),
        }),
        meta,
    );
    with_event!(
        append_event_sql!(
            "WITH u AS (
            UPDATE users SET email = $10, name = $11, password_hash = COALESCE($12, password_hash),
                   version = $4, updated_at = $9
            WHERE id = $3)"
        ),
        ev
    )
    .bind(&new_email)
    .bind(&new_name)
    .bind(password_hash)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome {
        status: StatusCode::OK,
        body: user_json(
            id,
            &new_email,
            new_name.as_deref(),
            version,
            u.created_at,
            ev.occurred_at,
            None,
        ),
        version,
    })
}

async fn delete_user(
    conn: &mut PgConnection,
    id: Uuid,
    expected: Option<i64>,
    meta: &Meta,
) -> Exec<Outcome> {
    let u = lock_user(conn, id, expected).await?;
    let version = u.version + 1;
    let ev = EventRow::new(id, version, EventPayload::UserDeleted(UserDeleted {}), meta);
    with_event!(
        append_event_sql!("WITH u AS (UPDATE users SET deleted_at = $9, version = $4, updated_at = $9 WHERE id = $3)"),
        ev
    )
    .execute(&mut *conn)
    .await?;
    Ok(Outcome {
        status: StatusCode::OK,
        body: user_json(
            id,
            &u.email,
            u.name.as_deref(),
            version,
            u.created_at,
            ev.occurred_at,
            Some(ev.occurred_at),
        ),
        version,
    })
}

async fn create_product(
    conn: &mut PgConnection,
    id: Uuid,
    name: &str,
    price: PriceCents,
    description: Option<&str>,
    meta: &Meta,
) -> Exec<Outcome> {
    let ev = EventRow::new(
        id,
        1,
        EventPayload::ProductCreated(ProductCreated {
            name: name.to_owned(),
            price_cents: price.0,
            description: description.map(str::to_owned),
        }),
        meta,
    );
    with_event!(
        append_event_sql!("WITH p AS (
            INSERT INTO products (id, name, price_cents, description, version, created_at, updated_at)
            VALUES ($3, $10, $11, $12, 1, $9, $9))"),
        ev
    )
    .bind(name)
    .bind(price.0)
    .bind(description)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome {
        status: StatusCode::CREATED,
        body: product_json(
            id,
            name,
            price.0,
            description,
            1,
            ev.occurred_at,
            ev.occurred_at,
            None,
        ),
        version: 1,
    })
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds the next seven parameters of a batched append to the events' columns, in this order: `occurred_at[]`,
/// `event_id[]`, `aggregate_type`, `type`, `schema_version`, `data[]`, `metadata[]` (a batch's events share one
/// aggregate and event type) — the multi-row counterpart of `with_event!`.
fn bind_events<'q>(q: PgQuery<'q>, evs: &[&'q EventRow]) -> PgQuery<'q> {
    let first = evs.first();
    q.bind(evs.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(evs.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(first.map(|e| e.aggregate_type))
        .bind(first.map(|e| e.event_type))
        .bind(first.map(|e| e.schema_version))
        .bind(evs.iter().map(|e| &e.data).collect::<Vec<_>>())
        .bind(evs.iter().map(|e| &e.metadata).collect::<Vec<_>>())
}

/// A product creation as [`create_products`] takes it.
pub struct NewProduct<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub price: PriceCents,
    pub description: Option<&'a str>,
    pub meta: &'a Meta,
}

/// Many product creations in ONE statement: every `products`, `events` and `outbox` row of the batch at once.
/// Creations cannot be refused once validated, so there is nothing to check per row; per-statement costs
/// (parse, plan, round trip) are paid once per batch instead of once per command. The events take
/// positions in the order given.
pub async fn create_products(
    conn: &mut PgConnection,
    items: &[NewProduct<'_>],
) -> Exec<Vec<Outcome>> {
    let evs: Vec<EventRow> = items
        .iter()
        .map(|p| {
            EventRow::new(
                p.id,
                1,
                EventPayload::ProductCreated(ProductCreated {
                    name: p.name.to_owned(),
                    price_cents: p.price.0,
                    description: p.description.map(str::to_owned),
                }),
                p.meta,
            )
        })
        .collect();
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let query = sqlx::query(
        "WITH p AS (
            INSERT INTO products (id, name, price_cents, description, version, created_at, updated_at)
            SELECT t.id, t.name, t.price_cents, t.description, 1, t.at, t.at
            FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[])
                 AS t(id, name, price_cents, description, at)),
         e AS (
            INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, metadata, occurred_at)
            SELECT t.event_id, $7, t.id, 1, $8, $9, t.data, t.metadata, t.at
            FROM unnest($6::uuid[], $1::uuid[], $10::jsonb[], $11::jsonb[], $5::timestamptz[])
                 WITH ORDINALITY AS t(event_id, id, data, metadata, at, n)
            ORDER BY t.n
            RETURNING position)
         INSERT INTO outbox (position) SELECT position FROM e",
    )
    .bind(items.iter().map(|p| p.id).collect::<Vec<_>>())
    .bind(items.iter().map(|p| p.name).collect::<Vec<_>>())
    .bind(items.iter().map(|p| p.price.0).collect::<Vec<_>>())
    .bind(items.iter().map(|p| p.description).collect::<Vec<_>>());
    bind_events(query, &evs.iter().collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(items
        .iter()
        .zip(&evs)
        .map(|(p, ev)| Outcome {
            status: StatusCode::CREATED,
            body: product_json(
                p.id,
                p.name,
                p.price.0,
                p.description,
                1,
                ev.occurred_at,
                ev.occurred_at,
                None,
            ),
            version: 1,
        })
        .collect())
}

struct ProductRow {
    name: String,
    price_cents: i64,
    description: Option<String>,
    version: i64,
    created_at: DateTime<Utc>,
}

async fn lock_product(
    conn: &mut PgConnection,
    id: Uuid,
    expected: Option<i64>,
) -> Exec<ProductRow> {
    let row = sqlx::query(
        "SELECT name, price_cents, description, version, created_at FROM products
         WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(CommandError::NotFound {
        entity: "product",
        id,
    })?;
    let p = ProductRow {
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        description: row.try_get("description")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
    };
    check_version(expected, p.version)?;
    Ok(p)
}

async fn update_product(
    conn: &mut PgConnection,
    id: Uuid,
    expected: Option<i64>,
    name: Option<&str>,
    price: Option<PriceCents>,
    description: Option<&Option<String>>,
    meta: &Meta,
) -> Exec<Outcome> {
    let p = lock_product(conn, id, expected).await?;
    let name = name.map(str::to_owned).unwrap_or(p.name);
    let price_cents = price.map(|p| p.0).unwrap_or(p.price_cents);
    let description = match description {
        Some(d) => d.clone(),
        None => p.description,
    };
    let version = p.version + 1;
    let ev = EventRow::new(
        id,
        version,
        EventPayload::ProductUpdated(ProductUpdated {
            name: name.clone(),
            price_cents,
            description: description.clone(),
        }),
        meta,
    );
    with_event!(
        append_event_sql!("WITH p AS (
            UPDATE products SET name = $10, price_cents = $11, description = $12, version = $4, updated_at = $9
            WHERE id = $3)"),
        ev
    )
    .bind(&name)
    .bind(price_cents)
    .bind(&description)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome {
        status: StatusCode::OK,
        body: product_json(
            id,
            &name,
            price_cents,
            description.as_deref(),
            version,
            p.created_at,
            ev.occurred_at,
            None,
        ),
        version,
    })
}

async fn delete_product(
    conn: &mut PgConnection,
    id: Uuid,
    expected: Option<i64>,
    meta: &Meta,
) -> Exec<Outcome> {
    let p = lock_product(conn, id, expected).await?;
    let version = p.version + 1;
    let ev = EventRow::new(
        id,
        version,
        EventPayload::ProductDeleted(ProductDeleted {}),
        meta,
    );
    with_event!(
        append_event_sql!("WITH p AS (UPDATE products SET deleted_at = $9, version = $4, updated_at = $9 WHERE id = $3)"),
        ev
    )
    .execute(&mut *conn)
    .await?;
    Ok(Outcome {
        status: StatusCode::OK,
        body: product_json(
            id,
            &p.name,
            p.price_cents,
            p.description.as_deref(),
            version,
            p.created_at,
            ev.occurred_at,
            Some(ev.occurred_at),
        ),
        version,
    })
}

fn order_json(
    id: Uuid,
    user: &OrderUser,
    status: &str,
    items: &[OrderItem],
    total_cents: i64,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    cancelled: Option<(DateTime<Utc>, Option<&str>)>,
) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|i| {
            json!({
                "productId": i.product_id, "productName": i.product_name,
                "unitPriceCents": i.unit_price_cents, "unitPrice": format_cents(i.unit_price_cents),
                "quantity": i.quantity,
                "lineTotalCents": i.line_total_cents, "lineTotal": format_cents(i.line_total_cents),
            })
        })
        .collect();
    let mut v = json!({
        "id": id, "userId": user.id,
        "user": {"id": user.id, "email": user.email, "name": user.name},
        // The API and the read model speak the events' vocabulary; the table keeps its own lower-case states.
        "status": if status == "cancelled" { "CANCELLED" } else { "CREATED" }, "items": items,
        "totalCents": total_cents, "total": format_cents(total_cents),
        "version": version, "createdAt": ts(created_at), "updatedAt": ts(updated_at),
    });
    if let Some((at, reason)) = cancelled {
        v["cancelledAt"] = json!(ts(at));
        v["cancelReason"] = json!(reason);
    }
    v
}

/// Users and products an order refers to, as read (FOR SHARE) in the order's transaction.
#[derive(Default)]
struct OrderRefs {
    users: HashMap<Uuid, (String, Option<String>)>,
    products: HashMap<Uuid, (String, i64)>,
}

/// Reads the live users and products among `user_ids`/`product_ids`, locking them FOR SHARE: a user or product
/// cannot be deleted or repriced while an order that read it is being written. Sorted ids keep the lock order
/// the same in every transaction.
async fn order_refs(
    conn: &mut PgConnection,
    mut user_ids: Vec<Uuid>,
    mut product_ids: Vec<Uuid>,
) -> Exec<OrderRefs> {
    user_ids.sort();
    user_ids.dedup();
    product_ids.sort();
    product_ids.dedup();
    let mut refs = OrderRefs::default();
    for r in sqlx::query(
        "SELECT id, email, name FROM users WHERE id = ANY($1) AND deleted_at IS NULL ORDER BY id FOR SHARE",
    )
    .bind(&user_ids)
    .fetch_all(&mut *conn)
    .await?
    {
        refs.users
            .insert(r.try_get("id")?, (r.try_get("email")?, r.try_get("name")?));
    }
    for r in sqlx::query(
        "SELECT id, name, price_cents FROM products WHERE id = ANY($1) AND deleted_at IS NULL ORDER BY id FOR SHARE",
    )
    .bind(&product_ids)
    .fetch_all(&mut *conn)
    .await?
    {
        refs.products
            .insert(r.try_get("id")?, (r.try_get("name")?, r.try_get("price_cents")?));
    }
    Ok(refs)
}

/// An order priced and checked against what it refers to, ready to be written.
struct PlannedOrder {
    id: Uuid,
    user: OrderUser,
    lines: Vec<OrderItem>,
    total: i64,
    ev: EventRow,
}

/// Prices `items` and checks the user and every product exist; refusals name each bad field.
fn plan_order(
    refs: &OrderRefs,
    id: Uuid,
    user_id: Uuid,
    items: &[(Uuid, u32)],
    meta: &Meta,
) -> Result<PlannedOrder, CommandError> {
    let mut errors = Vec::new();
    let user = match refs.users.get(&user_id) {
        Some((email, name)) => Some(OrderUser {
            id: user_id,
            email: email.clone(),
            name: name.clone(),
        }),
        None => {
            errors.push(FieldError {
                field: "userId".into(),
                message: "no such user".into(),
            });
            None
        }
    };
    let mut lines = Vec::with_capacity(items.len());
    let mut total: Option<i64> = Some(0);
    for (i, (pid, qty)) in items.iter().enumerate() {
        match refs.products.get(pid) {
            None => errors.push(FieldError {
                field: format!("items[{i}].productId"),
                message: "no such product".into(),
            }),
            Some((name, price)) => {
                let line = price.checked_mul(i64::from(*qty));
                total = total.and_then(|t| line.and_then(|l| t.checked_add(l)));
                lines.push(OrderItem {
                    product_id: *pid,
                    product_name: name.clone(),
                    unit_price_cents: *price,
                    quantity: *qty,
                    line_total_cents: line.unwrap_or(0),
                });
            }
        }
    }
    let (Some(user), true) = (user, errors.is_empty()) else {
        return Err(CommandError::Invalid(errors));
    };
    let total = total.ok_or_else(|| {
        CommandError::Invalid(vec![FieldError {
            field: "items".into(),
            message: "order total is too large".into(),
        }])
    })?;
    let ev = EventRow::new(
        id,
        1,
        EventPayload::OrderCreated(OrderCreated {
            user: user.clone(),
            items: lines.clone(),
            total_cents: total,
        }),
        meta,
    );
    Ok(PlannedOrder {
        id,
        user,
        lines,
        total,
        ev,
    })
}

impl PlannedOrder {
    fn outcome(&self) -> Outcome {
        Outcome {
            status: StatusCode::CREATED,
            body: order_json(
                self.id,
                &self.user,
                "placed",
                &self.lines,
                self.total,
                1,
                self.ev.occurred_at,
                self.ev.occurred_at,
                None,
            ),
            version: 1,
        }
    }
}

/// Writes planned orders (their rows, items, events and outbox rows) with ONE statement, in the order given.
async fn write_orders(conn: &mut PgConnection, orders: &[&PlannedOrder]) -> Exec<()> {
    if orders.is_empty() {
        return Ok(());
    }
    let mut item_order = Vec::new();
    let mut line_nos: Vec<i32> = Vec::new();
    let mut pids = Vec::new();
    let mut names = Vec::new();
    let mut unit = Vec::new();
    let mut qtys: Vec<i32> = Vec::new();
    let mut line_totals = Vec::new();
    for o in orders.iter() {
        for (n, l) in o.lines.iter().enumerate() {
            item_order.push(o.id);
            line_nos.push(i32::try_from(n + 1).unwrap_or(i32::MAX));
            pids.push(l.product_id);
            names.push(l.product_name.as_str());
            unit.push(l.unit_price_cents);
            qtys.push(i32::try_from(l.quantity).unwrap_or(i32::MAX));
            line_totals.push(l.line_total_cents);
        }
    }
    let query = sqlx::query(
        "WITH o AS (
            INSERT INTO orders (id, user_id, status, total_cents, version, created_at, updated_at)
            SELECT t.id, t.user_id, 'placed', t.total, 1, t.at, t.at
            FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[]) AS t(id, user_id, total, at)
            RETURNING id),
         i AS (
            INSERT INTO order_items (order_id, line_no, product_id, product_name, unit_price_cents, quantity, line_total_cents)
            SELECT t.* FROM unnest($11::uuid[], $12::int[], $13::uuid[], $14::text[], $15::bigint[], $16::int[], $17::bigint[])
                 AS t(order_id, line_no, product_id, product_name, unit_price_cents, quantity, line_total_cents)
            WHERE t.order_id IN (SELECT id FROM o)),
         e AS (
            INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, metadata, occurred_at)
            SELECT t.event_id, $6, t.id, 1, $7, $8, t.data, t.metadata, t.at
            FROM unnest($5::uuid[], $1::uuid[], $9::jsonb[], $10::jsonb[], $4::timestamptz[])
                 WITH ORDINALITY AS t(event_id, id, data, metadata, at, n)
            ORDER BY t.n
            RETURNING position)
         INSERT INTO outbox (position) SELECT position FROM e",
    )
    .bind(orders.iter().map(|o| o.id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.user.id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.total).collect::<Vec<_>>());
    bind_events(query, &orders.iter().map(|o| &o.ev).collect::<Vec<_>>())
        .bind(&item_order)
        .bind(&line_nos)
        .bind(&pids)
        .bind(&names)
        .bind(&unit)
        .bind(&qtys)
        .bind(&line_totals)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn create_order(
    conn: &mut PgConnection,
    id: Uuid,
    user_id: Uuid,
    items: &[(Uuid, u32)],
    meta: &Meta,
) -> Exec<Outcome> {
    let refs = order_refs(conn, vec![user_id], items.iter().map(|(p, _)| *p).collect()).await?;
    let planned = plan_order(&refs, id, user_id, items, meta)?;
    write_orders(conn, &[&planned]).await?;
    Ok(planned.outcome())
}

/// An order creation as [`create_orders`] takes it.
pub struct NewOrder<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub items: &'a [(Uuid, u32)],
    pub meta: &'a Meta,
}

/// Many order creations with three statements in all (users, products, then every row of every valid order),
/// instead of three per order. Each entry is the order's answer, refusals included, exactly as one by one:
/// the lookups are made in the same transaction, before any of these orders is written.
pub async fn create_orders(
    conn: &mut PgConnection,
    orders: &[NewOrder<'_>],
) -> Exec<Vec<Result<Outcome, CommandError>>> {
    let refs = order_refs(
        conn,
        orders.iter().map(|o| o.user_id).collect(),
        orders
            .iter()
            .flat_map(|o| o.items.iter().map(|(p, _)| *p))
            .collect(),
    )
    .await?;
    let plans: Vec<Result<PlannedOrder, CommandError>> = orders
        .iter()
        .map(|o| plan_order(&refs, o.id, o.user_id, o.items, o.meta))
        .collect();
    let valid: Vec<&PlannedOrder> = plans.iter().filter_map(|p| p.as_ref().ok()).collect();
    write_orders(conn, &valid).await?;
    Ok(plans.into_iter().map(|p| p.map(|p| p.outcome())).collect())
}

async fn cancel_order(
    conn: &mut PgConnection,
    id: Uuid,
    expected: Option<i64>,
    reason: Option<&str>,
    meta: &Meta,
) -> Exec<Outcome> {
    let row = sqlx::query(
        "SELECT o.status, o.version, o.total_cents, o.created_at, o.user_id, u.email, u.name
         FROM orders o JOIN users u ON u.id = o.user_id WHERE o.id = $1 FOR UPDATE OF o",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(CommandError::NotFound {
        entity: "order",
        id,
    })?;
    let status: String = row.try_get("status")?;
    let current: i64 = row.try_get("version")?;
    check_version(expected, current)?;
    if status == "cancelled" {
        return Err(CommandError::Conflict(format!("order {id} is already cancelled")).into());
    }
    let user = OrderUser {
        id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
    };
    let total: i64 = row.try_get("total_cents")?;
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    let items = sqlx::query(
        "SELECT product_id, product_name, unit_price_cents, quantity, line_total_cents
         FROM order_items WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        Ok(OrderItem {
            product_id: r.try_get("product_id")?,
            product_name: r.try_get("product_name")?,
            unit_price_cents: r.try_get("unit_price_cents")?,
            quantity: u32::try_from(r.try_get::<i32, _>("quantity")?).unwrap_or(0),
            line_total_cents: r.try_get("line_total_cents")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let version = current + 1;
    let ev = EventRow::new(
        id,
        version,
        EventPayload::OrderCancelled(OrderCancelled {
            reason: reason.map(str::to_owned),
        }),
        meta,
    );
    with_event!(
        append_event_sql!("WITH o AS (
            UPDATE orders SET status = 'cancelled', cancelled_at = $9, cancel_reason = $10, version = $4, updated_at = $9
            WHERE id = $3)"),
        ev
    )
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome {
        status: StatusCode::OK,
        body: order_json(
            id,
            &user,
            "cancelled",
            &items,
            total,
            version,
            created_at,
            ev.occurred_at,
            Some((ev.occurred_at, reason)),
        ),
        version,
    })
}
