//! `mongo-bench`: the raw rates of the Mongo-wire servers the devstack can run, on exactly the commands the
//! query service issues (services/query/src/store.rs), each with the server's CPU time beside it. Every server
//! is started privately by this program and deleted afterwards. Not a test: it prints figures, plus a line for
//! each place where a server's answer differs from MongoDB's.
//!
//! `mongo-bench --servers secantus,ferretdb,ferretdb-pg --docs 300000`

use std::{
    collections::HashSet,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use cqrs_devstack::{Mongo, MongoConfig, MongoServer, Postgres, cache_dir, free_port};
use mongodb::{
    Client, Database,
    bson::{Bson, Document, doc},
    options::{ClientOptions, FindOptions},
};

#[derive(Debug, Parser)]
#[command(name = "mongo-bench")]
struct Args {
    /// Servers, measured one after the other: `secantus` (in memory, as in the test profiles), `ferretdb` (SQLite,
    /// unsynced scratch files, as in the test profiles), `ferretdb-normal` (SQLite, synchronous=normal: the local
    /// stack), `ferretdb-full` (SQLite, fsync per commit: private servers), `ferretdb-pg` (on a private
    /// PostgreSQL with fsync off, as the test profiles run it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "secantus,ferretdb,ferretdb-pg"
    )]
    servers: Vec<String>,
    /// Documents inserted (and then paged through).
    #[arg(long, default_value_t = 300_000)]
    docs: usize,
    /// Documents per `insert` command.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Statements per guarded `update` command, each size measured (500: the query service's default batch).
    /// FerretDB v1 deadlocks on an `update` command with 100 (SQLite) or 50 (PostgreSQL) statements that match
    /// existing documents, so larger sizes are skipped for it (and the hang is shown at the end of its run).
    #[arg(long, value_delimiter = ',', default_value = "500,40")]
    update_batches: Vec<usize>,
    /// Guarded updates per size (and as many already-applied ones).
    #[arg(long, default_value_t = 20_000)]
    updates: usize,
    /// Single finds by `_id`, spread over `--concurrency` tasks.
    #[arg(long, default_value_t = 20_000)]
    finds: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The driver's connection pool (its default, 10, is what the query service uses).
    #[arg(long, default_value_t = 10)]
    pool: u32,
    /// `$in` queries of 100 ids.
    #[arg(long, default_value_t = 300)]
    in_queries: usize,
    /// Cap on the time of each measurement after the inserts: a server that scans the whole collection for
    /// every statement would otherwise take hours. The rate is then over the work done until the cap.
    #[arg(long, default_value_t = 60)]
    phase_seconds: u64,
}

/// CPU time of the server's processes: its own process group, plus a PostgreSQL cluster behind it.
struct Cpu {
    group: u32,
    postmaster: Option<u32>,
}

/// `(pid, ppid, pgrp, utime + stime)` of every process.
fn processes() -> Vec<(u32, u32, u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Some((
            pid,
            u32::try_from(n(1)).ok()?,
            u32::try_from(n(2)).ok()?,
            n(11) + n(12),
        ))
    })
    .collect()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

impl Cpu {
    /// Seconds of CPU: (server, its PostgreSQL).
    fn seconds(&self) -> (f64, f64) {
        let hz = clock_ticks();
        let (mut server, mut pg) = (0, 0);
        for (pid, ppid, pgrp, ticks) in processes() {
            if pgrp == self.group {
                server += ticks;
            } else if self.postmaster.is_some_and(|p| p == pid || p == ppid) {
                pg += ticks;
            }
        }
        (server as f64 / hz, pg as f64 / hz)
    }
}

struct Meter<'a> {
    cpu: &'a Cpu,
    t0: Instant,
    c0: (f64, f64),
}

impl<'a> Meter<'a> {
    fn start(cpu: &'a Cpu) -> Self {
        Self {
            cpu,
            c0: cpu.seconds(),
            t0: Instant::now(),
        }
    }
    /// Prints `n` `unit`s per second and the server's CPU over the interval.
    fn report(self, server: &str, what: &str, n: usize, unit: &str) -> f64 {
        let secs = self.t0.elapsed().as_secs_f64();
        let c1 = self.cpu.seconds();
        let (cs, cp) = (c1.0 - self.c0.0, c1.1 - self.c0.1);
        let rate = n as f64 / secs;
        let pg = if self.cpu.postmaster.is_some() {
            format!(" + postgres {:.2} cores", cp / secs)
        } else {
            String::new()
        };
        println!(
            "{server:<16} {what:<44} {rate:>9.0} {unit}/s  ({n} in {secs:.1} s; server CPU {:.2} cores{pg}, {:.0} µs/{unit})",
            cs / secs,
            (cs + cp) / n as f64 * 1e6,
        );
        rate
    }
}

/// A small deterministic generator for picking ids.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn product(id: &str, i: usize, version: i64) -> Document {
    let cents = 1000 + (i as i64 % 9000);
    doc! {
        "_id": id, "name": format!("product {i}"), "price": format!("{}.{:02}", cents / 100, cents % 100),
        "priceCents": cents, "description": format!("A sturdy product, number {i}, for every household."),
        "version": version, "lastEventId": uuid::Uuid::now_v7().to_string(),
        "createdAt": "2026-11-24T00:00:00.000Z", "updatedAt": "2026-11-24T00:00:00.000Z",
    }
}

/// `(index, code)` of each write error.
fn write_errors(reply: &Document) -> Vec<(i64, i64)> {
    let num = |b: Option<&Bson>| match b {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Double(v)) => *v as i64,
        _ => -1,
    };
    reply
        .get_array("writeErrors")
        .map(|a| {
            a.iter()
                .filter_map(Bson::as_document)
                .map(|e| (num(e.get("index")), num(e.get("code"))))
                .collect()
        })
        .unwrap_or_default()
}

/// The `update` command of `Store::write_batch`: every statement guarded by `version < new`, upsert, unordered.
async fn guarded_update(db: &Database, docs: &[Document]) -> anyhow::Result<Document> {
    let statements: Vec<Bson> = docs
        .iter()
        .map(|d| {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            let version = d.get("version").cloned().unwrap_or(Bson::Int64(0));
            Bson::Document(doc! {"q": {"_id": id, "version": {"$lt": version}}, "u": d.clone(), "upsert": true})
        })
        .collect();
    Ok(db
        .run_command(doc! {
            "update": "products", "updates": statements, "ordered": false, "writeConcern": {"w": "majority"},
        })
        .await?)
}

/// A started server and what to clean up after it.
struct Running {
    mongo: Mongo,
    pg: Option<Postgres>,
    dir: PathBuf,
}

async fn start(name: &str) -> anyhow::Result<Running> {
    let dir = cache_dir()
        .join("run")
        .join(format!("mongo-bench-{}", uuid::Uuid::new_v4().simple()));
    let (server, storage, sync_on_commit, pg) = match name {
        "secantus" => (MongoServer::Secantus, None, false, None),
        "ferretdb" => (MongoServer::FerretSqlite, None, false, None),
        "ferretdb-normal" => (
            MongoServer::FerretSqlite,
            Some(dir.join("data")),
            false,
            None,
        ),
        "ferretdb-full" => (
            MongoServer::FerretSqlite,
            Some(dir.join("data")),
            true,
            None,
        ),
        "ferretdb-pg" => {
            let pg = Postgres::start_private().await?;
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&pg.url("postgres")).await?;
            sqlx::query("create database ferretdb")
                .execute(&mut c)
                .await?;
            let _ = c.close().await;
            let url = pg.url("ferretdb");
            (MongoServer::FerretPostgres { url }, None, false, Some(pg))
        }
        other => bail!("unknown server {other:?}"),
    };
    let mongo = Mongo::start_with(MongoConfig {
        server,
        port: free_port()?,
        dir: dir.clone(),
        storage,
        sync_on_commit,
        host: cqrs_devstack::loopback(),
    })
    .await?;
    Ok(Running { mongo, pg, dir })
}

async fn bench(args: &Args, name: &str) -> anyhow::Result<()> {
    let mut r = start(name)
        .await
        .with_context(|| format!("starting {name}"))?;
    let result = run(args, name, &r).await;
    let _ = r.mongo.stop().await;
    let _ = std::fs::remove_dir_all(&r.dir);
    drop(r.pg.take());
    result
}

async fn run(args: &Args, name: &str, r: &Running) -> anyhow::Result<()> {
    let cpu = Cpu {
        group: r.mongo.pid().context("server has no pid")?,
        postmaster: r.pg.as_ref().and_then(Postgres::pid),
    };
    let mut opts = ClientOptions::parse(r.mongo.url()).await?;
    opts.max_pool_size = Some(args.pool);
    let client = Client::with_options(opts)?;
    let db = client.database("bench");
    let coll = db.collection::<Document>("products");
    // The collection exists before the clock starts (the projection's first batch creates it, unmeasured).
    coll.insert_one(doc! {"_id": "~warm-up"}).await?;
    coll.delete_one(doc! {"_id": "~warm-up"}).await?;

    // insert: one command per batch, unordered, majority — as Store::write_batch sends new documents.
    let ids: Vec<String> = (0..args.docs)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let m = Meter::start(&cpu);
    for (b, chunk) in ids.chunks(args.batch).enumerate() {
        let docs: Vec<Document> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| product(id, b * args.batch + i, 1))
            .collect();
        let reply = db
            .run_command(doc! {
                "insert": "products", "documents": docs, "ordered": false, "writeConcern": {"w": "majority"},
            })
            .await?;
        ensure!(
            write_errors(&reply).is_empty(),
            "insert write errors: {reply}"
        );
    }
    m.report(
        name,
        &format!("insert, {} docs per command", args.batch),
        args.docs,
        "doc",
    );

    // Guarded updates, per batch size, each size on documents of its own.
    let n = args
        .updates
        .min(args.docs / args.update_batches.len().max(1));
    let limit = matched_update_limit(&r.mongo);
    for (k, &size) in args.update_batches.iter().enumerate() {
        if limit.is_some_and(|l| size >= l) {
            println!(
                "{name:<16} guarded update, {size}/cmd: skipped (this server deadlocks on {} or more matching statements)",
                limit.unwrap_or_default()
            );
            continue;
        }
        let ids = &ids[k * n..(k + 1) * n];
        let cap = Duration::from_secs(args.phase_seconds);
        guarded_updates(name, &db, &cpu, ids, size, cap).await?;
    }
    fidelity_mixed_batch(name, &db).await?;

    // find by _id, one at a time, from many tasks — the GET /products/{id} path.
    let m = Meter::start(&cpu);
    let per_task = args.finds / args.concurrency;
    let deadline = Instant::now() + Duration::from_secs(args.phase_seconds);
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let coll = coll.clone();
        let ids: Vec<String> = {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
            (0..per_task)
                .map(|_| ids[rng.below(ids.len())].clone())
                .collect()
        };
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            for id in ids {
                if Instant::now() >= deadline {
                    break;
                }
                let found = coll.find_one(doc! {"_id": &id}).await?;
                ensure!(found.is_some(), "{id} not found");
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut finds = 0;
    for t in tasks {
        finds += t.await??;
    }
    m.report(
        name,
        &format!("find by _id, {} tasks", args.concurrency),
        finds,
        "find",
    );

    // `$in` of 100 ids, one query after the other — Store::fetch.
    let mut rng = Rng(42);
    let m = Meter::start(&cpu);
    let deadline = Instant::now() + Duration::from_secs(args.phase_seconds);
    let mut queries = 0;
    while queries < args.in_queries && Instant::now() < deadline {
        queries += 1;
        let chunk: Vec<&String> = (0..100).map(|_| &ids[rng.below(ids.len())]).collect();
        let want: HashSet<&String> = chunk.iter().copied().collect();
        let mut cursor = coll.find(doc! {"_id": {"$in": &chunk}}).await?;
        let mut got = 0;
        while cursor.advance().await? {
            got += 1;
        }
        ensure!(got == want.len(), "$in returned {got} of {}", want.len());
    }
    m.report(name, "$in of 100 ids", queries, "query");

    // Pages of live documents in _id order — Store::list, walked from the start.
    let m = Meter::start(&cpu);
    let deadline = Instant::now() + Duration::from_secs(args.phase_seconds);
    let (mut pages, mut docs, mut after): (usize, usize, Option<String>) = (0, 0, None);
    loop {
        let mut filter = doc! {"deleted": {"$ne": true}};
        if let Some(a) = &after {
            filter.insert("_id", doc! {"$gt": a});
        }
        let opts = FindOptions::builder()
            .sort(doc! {"_id": 1})
            .limit(500)
            .build();
        let mut cursor = coll.find(filter).with_options(opts).await?;
        let mut n = 0;
        while cursor.advance().await? {
            let d = cursor.deserialize_current()?;
            after = Some(d.get_str("_id")?.to_owned());
            n += 1;
        }
        pages += 1;
        docs += n;
        if n < 500 || Instant::now() >= deadline {
            break;
        }
    }
    m.report(
        name,
        &format!("list page of 500 ({docs} docs walked)"),
        pages,
        "page",
    );
    if let Some(limit) = matched_update_limit(&r.mongo) {
        deadlock_probe(name, &client, limit).await?;
    }
    Ok(())
}

/// FerretDB v1 keeps every matched statement's cursor (and so a pooled backend connection) open until the whole
/// `update` command ends; the statement that finds the pool empty waits forever. Pool: SQLite 100, PostgreSQL 50.
fn matched_update_limit(m: &Mongo) -> Option<usize> {
    match m.server() {
        MongoServer::Secantus => None,
        MongoServer::FerretSqlite => Some(100),
        MongoServer::FerretPostgres { .. } => Some(50),
    }
}

/// Older → applied (version 1 → 2, full replacement), then the same again: every document is already at that
/// version, so every statement's upsert must collide on `_id` (duplicate key 11000, one write error per
/// statement, the unordered batch going on past each).
async fn guarded_updates(
    name: &str,
    db: &Database,
    cpu: &Cpu,
    ids: &[String],
    size: usize,
    cap: Duration,
) -> anyhow::Result<()> {
    let batches: Vec<Vec<Document>> = ids
        .chunks(size)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, id)| product(id, b * size + i, 2))
                .collect()
        })
        .collect();
    let deadline = Instant::now() + cap;
    let m = Meter::start(cpu);
    let (mut modified, mut sent) = (0, 0);
    for docs in &batches {
        if Instant::now() >= deadline {
            break;
        }
        sent += 1;
        let reply = guarded_update(db, docs).await?;
        ensure!(
            write_errors(&reply).is_empty(),
            "update write errors: {reply}"
        );
        modified += reply.get_i32("nModified").unwrap_or_default() as usize;
    }
    let n: usize = batches[..sent].iter().map(Vec::len).sum();
    m.report(
        name,
        &format!("guarded update (older → applied), {size}/cmd"),
        n,
        "doc",
    );
    ensure!(modified == n, "{modified} of {n} modified");
    // The same batches again, on the documents updated above.
    let batches = &batches[..sent];

    let m = Meter::start(cpu);
    let mut errors = 0;
    for docs in batches {
        let reply = guarded_update(db, docs).await?;
        let errs = write_errors(&reply);
        ensure!(
            errs.iter().all(|(_, c)| *c == 11000),
            "unexpected write errors: {reply}"
        );
        errors += errs.len();
    }
    m.report(
        name,
        &format!("guarded update (already newer), {size}/cmd"),
        n,
        "doc",
    );
    if errors != n {
        println!(
            "{name:<16} DIFFERS: {n} already-newer statements gave {errors} duplicate-key errors (MongoDB: {n}): \
             the rest of each batch was skipped"
        );
    }
    Ok(())
}

/// Shows the deadlock: one `update` command whose `statements` statements all match, in a database of its own
/// (the stuck command keeps that database's connections for good).
async fn deadlock_probe(name: &str, client: &Client, statements: usize) -> anyhow::Result<()> {
    let db = client.database("probe");
    let ids: Vec<String> = (0..statements).map(|i| format!("p{i}")).collect();
    let docs: Vec<Document> = ids.iter().map(|id| product(id, 0, 1)).collect();
    db.collection::<Document>("products")
        .insert_many(docs)
        .await?;
    let newer: Vec<Document> = ids.iter().map(|id| product(id, 0, 2)).collect();
    match tokio::time::timeout(Duration::from_secs(15), guarded_update(&db, &newer)).await {
        Ok(r) => {
            r?;
            println!("{name:<16} {statements} matching statements in one update: answered");
        }
        Err(_) => println!(
            "{name:<16} DIFFERS: {statements} matching statements in one update: no reply within 15 s (deadlock)"
        ),
    }
    Ok(())
}

/// One `update` batch mixing the cases, checked against what MongoDB answers: [0] already newer,
/// [1] older (applied), [2] already newer, [3] missing (upserted).
async fn fidelity_mixed_batch(name: &str, db: &Database) -> anyhow::Result<()> {
    let id = || uuid::Uuid::new_v4().to_string();
    let (newer_a, older, newer_b, missing) = (id(), id(), id(), id());
    db.collection::<Document>("products")
        .insert_many([
            product(&newer_a, 0, 5),
            product(&older, 1, 1),
            product(&newer_b, 2, 5),
        ])
        .await?;
    let batch = [
        product(&newer_a, 0, 2),
        product(&older, 1, 2),
        product(&newer_b, 2, 2),
        product(&missing, 3, 1),
    ];
    let reply = guarded_update(db, &batch).await?;
    let errs = write_errors(&reply);
    let coll = db.collection::<Document>("products");
    let version = |id: String| {
        let coll = coll.clone();
        async move {
            anyhow::Ok(
                coll.find_one(doc! {"_id": id})
                    .await?
                    .and_then(|d| d.get_i64("version").ok()),
            )
        }
    };
    let (v_older, v_missing) = (version(older.clone()).await?, version(missing).await?);
    let expected = vec![(0, 11000), (2, 11000)];
    if errs == expected && v_older == Some(2) && v_missing == Some(1) {
        println!(
            "{name:<16} mixed guarded batch: as MongoDB (errors at 0 and 2, 1 applied, 3 upserted)"
        );
    } else {
        println!(
            "{name:<16} DIFFERS: mixed guarded batch [newer, older, newer, missing] → write errors {errs:?} \
             (MongoDB: {expected:?}), older doc now version {v_older:?} (MongoDB: Some(2)), missing doc {v_missing:?} \
             (MongoDB: Some(1))"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "mongo-bench: {} docs, batches of {}, {} updates, {} finds over {} tasks (pool {}), {} $in queries, {} cores",
        args.docs,
        args.batch,
        args.updates,
        args.finds,
        args.concurrency,
        args.pool,
        args.in_queries,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for name in &args.servers {
        bench(&args, name).await?;
    }
    Ok(())
}
