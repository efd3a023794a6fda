//! Group commit: concurrent commands are queued, and each worker takes what is queued (up to a maximum,
//! optionally waiting a short window for more) and writes it in ONE transaction. Refusals are detected by
//! reads (see `commands`), so they never abort the transaction; a command that does raise a database error
//! is taken out, answered on its own, and the rest of the batch is re-run in a fresh transaction. Every
//! command is answered only after its transaction committed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;
use sqlx::{Connection, PgPool};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use crate::{
    commands::{self, Command, CommandError, ExecError, Meta, Outcome},
    metrics::Metrics,
};

/// An `Idempotency-Key` and the hash of the request it came with.
#[derive(Debug, Clone)]
pub struct IdemRequest {
    pub key: String,
    pub hash: String,
}

/// The answer to a queued command.
#[derive(Debug, Clone)]
pub enum Reply {
    Done(Outcome),
    /// The idempotency key is already taken by a committed request: the caller replays (or refuses) it.
    KeyTaken,
}

struct Job {
    cmd: Command,
    meta: Meta,
    idem: Option<IdemRequest>,
    attempts: u8,
    reply: oneshot::Sender<Result<Reply, CommandError>>,
}

#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Job>,
}

pub struct Settings {
    pub window: Duration,
    pub max: usize,
    pub workers: usize,
    pub idempotency_ttl: Duration,
}

impl GroupCommit {
    /// Starts the workers; they stop when every `GroupCommit` clone is dropped and the queue is drained.
    pub fn start(
        pool: PgPool,
        settings: Settings,
        metrics: Metrics,
        committed: Arc<Notify>,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel::<Job>(16_384);
        let rx = Arc::new(Mutex::new(rx));
        let settings = Arc::new(settings);
        let handles = (0..settings.workers.max(1))
            .map(|_| {
                let rx = rx.clone();
                let pool = pool.clone();
                let settings = settings.clone();
                let metrics = metrics.clone();
                let committed = committed.clone();
                tokio::spawn(async move {
                    while let Some(batch) = next_batch(&rx, &settings).await {
                        run_batch(&pool, batch, &settings, &metrics, &committed).await;
                    }
                })
            })
            .collect();
        (Self { tx }, handles)
    }

    /// Queues a command and waits for its committed answer.
    pub async fn submit(
        &self,
        cmd: Command,
        meta: Meta,
        idem: Option<IdemRequest>,
    ) -> Result<Reply, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                cmd,
                meta,
                idem,
                attempts: 0,
                reply,
            })
            .await
            .map_err(|_| CommandError::Unavailable("shutting down".into()))?;
        rx.await.map_err(|_| {
            CommandError::Unavailable("the command was dropped (shutting down)".into())
        })?
    }
}

async fn next_batch(rx: &Mutex<mpsc::Receiver<Job>>, s: &Settings) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < s.max {
        match rx.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    if !s.window.is_zero() {
        let deadline = tokio::time::Instant::now() + s.window;
        while batch.len() < s.max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(j)) => batch.push(j),
                _ => break,
            }
        }
    }
    Some(batch)
}

/// Deadlocks and serialization failures are nobody's fault: the command is re-run.
fn retryable(e: &sqlx::Error) -> bool {
    matches!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("40P01") | Some("40001") | Some("55P03")
    )
}

fn map_db_error(e: &sqlx::Error) -> CommandError {
    if let Some(d) = e.as_database_error() {
        if d.code().as_deref() == Some("23505") && d.constraint() == Some("users_email_lower_key") {
            return CommandError::DuplicateEmail;
        }
        // Only the code and message: a constraint's detail can quote a whole row.
        tracing::warn!(code = ?d.code(), message = d.message(), "command failed in the database");
        return CommandError::Internal("the command could not be written".into());
    }
    tracing::warn!(error = %e, "database unavailable");
    CommandError::Unavailable("database unavailable".into())
}

async fn run_batch(
    pool: &PgPool,
    mut jobs: Vec<Job>,
    s: &Settings,
    metrics: &Metrics,
    committed: &Notify,
) {
    // Whether this batch's creations go through one statement per kind. Turned off (for this batch) when that
    // statement fails, so a bad command is found and answered on its own by the one-by-one path.
    let mut bulk = true;
    loop {
        if jobs.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut conn = match pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let err = map_db_error(&e);
                for j in jobs {
                    let _ = j.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut tx = match conn.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                let err = map_db_error(&e);
                for j in jobs {
                    let _ = j.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut results: Vec<Option<Result<Reply, CommandError>>> =
            jobs.iter().map(|_| None).collect();
        if bulk {
            match create_at_once(&mut tx, &jobs, &mut results, metrics).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(error = ?e, "batched creation failed; one by one");
                    let _ = tx.rollback().await;
                    bulk = false;
                    continue;
                }
            }
        }
        let mut failure: Option<(usize, sqlx::Error)> = None;
        for (i, job) in jobs.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            match execute_job(&mut tx, job, s).await {
                Ok(r) => results[i] = Some(Ok(r)),
                Err(ExecError::Rejected(e)) => results[i] = Some(Err(e)),
                Err(ExecError::Db(e)) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        match failure {
            None => {
                let n = jobs.len();
                match tx.commit().await {
                    Ok(()) => {
                        metrics.batch_size.observe(n as f64);
                        metrics
                            .batch_seconds
                            .observe(started.elapsed().as_secs_f64());
                        committed.notify_one();
                        for (j, r) in jobs.into_iter().zip(results) {
                            let _ = j.reply.send(r.unwrap_or_else(|| {
                                Err(CommandError::Internal("the command was not run".into()))
                            }));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "group commit failed; outcome unknown");
                        for j in jobs {
                            let _ = j.reply.send(Err(CommandError::Unavailable(
                                "commit outcome unknown; retry with the same Idempotency-Key"
                                    .into(),
                            )));
                        }
                    }
                }
                return;
            }
            Some((i, e)) => {
                let _ = tx.rollback().await;
                let mut job = jobs.remove(i);
                if retryable(&e) && job.attempts < 5 {
                    job.attempts += 1;
                    jobs.push(job);
                } else {
                    let _ = job.reply.send(Err(map_db_error(&e)));
                }
                if e.as_database_error().is_none() {
                    // The connection itself failed: answer everyone rather than loop on a dead database.
                    let err = map_db_error(&e);
                    for j in jobs {
                        let _ = j.reply.send(Err(err.clone()));
                    }
                    return;
                }
            }
        }
    }
}

/// Writes every plain product creation of `jobs` (no Idempotency-Key: those need their own claim row) with
/// one statement, every plain user creation with another, and every plain order creation with three (see
/// `commands::create_orders`), filling their `results`. Fewer than two of a kind are left to the one-by-one
/// path. Creations can run first: a creation's id is new, so no other command of the batch refers to it.
async fn create_at_once(
    conn: &mut sqlx::PgConnection,
    jobs: &[Job],
    results: &mut [Option<Result<Reply, CommandError>>],
    metrics: &Metrics,
) -> Result<(), ExecError> {
    let mut at = Vec::new();
    let mut items = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if let (
            Command::CreateProduct {
                id,
                name,
                price,
                description,
            },
            None,
        ) = (&j.cmd, &j.idem)
        {
            at.push(i);
            items.push(commands::NewProduct {
                id: *id,
                name,
                price: *price,
                description: description.as_deref(),
                meta: &j.meta,
            });
        }
    }
    if items.len() >= 2 {
        let outcomes = commands::create_products(conn, &items).await?;
        metrics
            .bulk_created
            .with_label_values(&["product"])
            .inc_by(items.len() as u64);
        for (i, o) in at.into_iter().zip(outcomes) {
            results[i] = Some(Ok(Reply::Done(o)));
        }
    }
    let mut at = Vec::new();
    let mut users = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if let (
            Command::CreateUser {
                id,
                email,
                password_hash,
                name,
            },
            None,
        ) = (&j.cmd, &j.idem)
        {
            at.push(i);
            users.push(commands::NewUser {
                id: *id,
                email,
                password_hash,
                name: name.as_deref(),
                meta: &j.meta,
            });
        }
    }
    if users.len() >= 2 {
        let outcomes = commands::create_users(conn, &users).await?;
        metrics
            .bulk_created
            .with_label_values(&["user"])
            .inc_by(outcomes.iter().filter(|o| o.is_ok()).count() as u64);
        for (i, o) in at.into_iter().zip(outcomes) {
            results[i] = Some(o.map(Reply::Done));
        }
    }
    let mut at_orders = Vec::new();
    let mut orders = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if let (Command::CreateOrder { id, user_id, items }, None) = (&j.cmd, &j.idem) {
            at_orders.push(i);
            orders.push(commands::NewOrder {
                id: *id,
                user_id: *user_id,
                items,
                meta: &j.meta,
            });
        }
    }
    if orders.len() >= 2 {
        let outcomes = commands::create_orders(conn, &orders).await?;
        metrics
            .bulk_created
            .with_label_values(&["order"])
            .inc_by(outcomes.iter().filter(|o| o.is_ok()).count() as u64);
        for (i, o) in at_orders.into_iter().zip(outcomes) {
            results[i] = Some(o.map(Reply::Done));
        }
    }
    Ok(())
}

async fn execute_job(
    conn: &mut sqlx::PgConnection,
    job: &Job,
    s: &Settings,
) -> Result<Reply, ExecError> {
    let Some(idem) = &job.idem else {
        return commands::execute(conn, &job.cmd, &job.meta)
            .await
            .map(Reply::Done);
    };
    // Claim the key first (an expired claim may be taken over). If another request holds it, this command is
    // not executed; the caller replays the stored response after our commit.
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (key, request_hash, response_status, response_body, created_at)
         VALUES ($1, $2, 0, 'null'::jsonb, now())
         ON CONFLICT (key) DO UPDATE
            SET request_hash = excluded.request_hash, response_status = 0, response_body = 'null'::jsonb,
                created_at = now()
            WHERE idempotency_keys.created_at < now() - make_interval(secs => $3)
         RETURNING key",
    )
    .bind(&idem.key)
    .bind(&idem.hash)
    .bind(s.idempotency_ttl.as_secs_f64())
    .fetch_optional(&mut *conn)
    .await?;
    if claimed.is_none() {
        return Ok(Reply::KeyTaken);
    }
    match commands::execute(conn, &job.cmd, &job.meta).await {
        Ok(outcome) => {
            sqlx::query("UPDATE idempotency_keys SET response_status = $2, response_body = $3 WHERE key = $1")
                .bind(&idem.key)
                .bind(i32::from(outcome.status.as_u16()))
                .bind(&outcome.body)
                .execute(&mut *conn)
                .await?;
            Ok(Reply::Done(outcome))
        }
        Err(ExecError::Rejected(e)) => {
            // Refusals are not remembered: a retry is evaluated afresh.
            sqlx::query("DELETE FROM idempotency_keys WHERE key = $1")
                .bind(&idem.key)
                .execute(&mut *conn)
                .await?;
            Err(ExecError::Rejected(e))
        }
        Err(e) => Err(e),
    }
}

/// A stored idempotent response.
pub struct StoredResponse {
    pub request_hash: String,
    pub status: u16,
    pub body: Value,
}

/// The committed response stored under `key`, if it is still within its time to live.
pub async fn stored_response(
    pool: &PgPool,
    key: &str,
    ttl: Duration,
) -> Result<Option<StoredResponse>, sqlx::Error> {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys
         WHERE key = $1 AND response_status > 0 AND created_at >= now() - make_interval(secs => $2)",
    )
    .bind(key)
    .bind(ttl.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(StoredResponse {
            request_hash: r.try_get("request_hash")?,
            status: u16::try_from(r.try_get::<i32, _>("response_status")?).unwrap_or(500),
            body: r.try_get("response_body")?,
        })
    })
    .transpose()
}

/// Deletes expired idempotency keys, periodically.
pub async fn expire_keys(pool: PgPool, ttl: Duration) {
    let mut tick =
        tokio::time::interval(Duration::from_secs(60).min(ttl.max(Duration::from_secs(1))));
    loop {
        tick.tick().await;
        let r = sqlx::query(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
        )
        .bind(ttl.as_secs_f64())
        .execute(&pool)
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "expiring idempotency keys failed; will retry");
        }
    }
}
