//! `scenario seed`: the seed's request bodies at scale, then every record read back through the gateway with
//! read-your-writes and compared field by field with what the server must have computed.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    E2eError,
    client::{Gateway, Resp},
    format_cents,
    stats::{PhaseSummary, Recorder, progress},
};

#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub users: usize,
    pub products: usize,
    pub orders: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Items per order: 1..=max_items, each a random product.
    pub max_items: usize,
    /// Random seed (orders' users/products, prices, quantities).
    pub seed: u64,
    /// Print progress about once a second.
    pub progress: bool,
    /// How records are read back.
    pub verify: VerifyMode,
}

impl Default for SeedOptions {
    fn default() -> Self {
        Self {
            users: 200,
            products: 200,
            orders: 200,
            concurrency: 32,
            max_items: 3,
            seed: 7,
            progress: false,
            verify: VerifyMode::Each,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UserRec {
    pub id: String,
    pub email: String,
    pub name: Option<String>,
    pub version: u64,
}

#[derive(Debug, Clone)]
pub struct ProductRec {
    pub id: String,
    pub name: String,
    pub price_cents: i64,
    pub description: Option<String>,
    pub version: u64,
}

#[derive(Debug, Clone)]
pub struct OrderRec {
    pub id: String,
    pub user: usize,
    /// (product index, quantity)
    pub items: Vec<(usize, u32)>,
    pub version: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub run_id: String,
    pub users: usize,
    pub products: usize,
    pub orders: usize,
    pub concurrency: usize,
    pub verify: VerifyMode,
    pub phases: Vec<PhaseSummary>,
    pub write_seconds: f64,
    pub total_seconds: f64,
    /// Acknowledged records read back and compared (mismatches counted separately).
    pub verified: u64,
    pub mismatches: u64,
    /// The first few mismatches, for the log.
    pub mismatch_examples: Vec<String>,
}

impl SeedReport {
    pub fn passed(&self) -> bool {
        self.mismatches == 0
            && self
                .phases
                .iter()
                .all(|p| p.errors.keys().all(|k| k.starts_with("retry")) && p.mismatches == 0)
    }

    pub fn print(&self) {
        println!(
            "seed {}: {} users, {} products, {} orders, concurrency {}, verify {:?}",
            self.run_id, self.users, self.products, self.orders, self.concurrency, self.verify
        );
        for p in &self.phases {
            println!("  {}", p.line());
        }
        println!(
            "  writes {:.2}s, total {:.2}s, {} records verified, {} mismatches",
            self.write_seconds, self.total_seconds, self.verified, self.mismatches
        );
        for m in &self.mismatch_examples {
            println!("    mismatch: {m}");
        }
    }
}

/// Collects mismatch descriptions (all counted, the first 20 kept).
#[derive(Default)]
struct Mismatches {
    count: AtomicU64,
    examples: std::sync::Mutex<Vec<String>>,
}

impl Mismatches {
    fn add(&self, rec: &Recorder, what: String) {
        rec.mismatch();
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.examples.lock()
            && e.len() < 20
        {
            e.push(what);
        }
    }
}

fn status_kind(r: &Result<Resp, E2eError>) -> String {
    match r {
        Ok(r) => r.status.as_u16().to_string(),
        Err(_) => "transport".into(),
    }
}

/// The body of the seed's user creation.
pub fn user_body(run: &str, i: usize) -> Value {
    json!({"email": format!("u{i}-{run}@e2e.example.com"), "password": format!("pw-{run}-{i}-secret"), "name": format!("User {i} {run}")})
}

/// The body of the seed's product creation (price as a JSON number with two decimals, like the seed).
pub fn product_body(run: &str, i: usize, price_cents: i64) -> Value {
    let price: Value = serde_json::from_str(&format_cents(price_cents))
        .unwrap_or_else(|_| json!(price_cents / 100));
    let mut b = json!({"name": format!("Product {i} {run}"), "price": price});
    if i.is_multiple_of(2) {
        b["description"] = json!(format!("Seed product {i} of run {run}"));
    }
    b
}

async fn run_phase<T, F, Fut>(
    name: &str,
    n: usize,
    concurrency: usize,
    show: bool,
    f: F,
) -> (Vec<Option<T>>, PhaseSummary)
where
    F: Fn(usize, Arc<Recorder>) -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let rec = Arc::new(Recorder::new(name));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let prog = show.then(|| {
        let r = rec.clone();
        tokio::spawn(progress(
            name.to_owned(),
            n as u64,
            move || r.done(),
            stop_rx,
        ))
    });
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let results: Vec<(usize, Option<T>)> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i, rec.clone());
            async move { (i, fut.await) }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (i, r) in results {
        out[i] = r;
    }
    rec.finish();
    let _ = stop_tx.send(true);
    if let Some(p) = prog {
        let _ = p.await;
    }
    (out, rec.summary())
}

/// `POST path`: on a 201 with an id and a version, those and the answer; anything else is recorded (an error by
/// status, or a mismatch for a 201 without id/version) and gives `None`.
async fn create(
    gw: &Gateway,
    rec: &Recorder,
    mm: &Mismatches,
    path: &str,
    what: &str,
    body: &Value,
) -> Option<(String, u64, Resp)> {
    match gw.post(path, body).await {
        Ok(r) if r.status.as_u16() == 201 => {
            rec.ok(r.latency);
            match (r.id(), r.version()) {
                (Some(id), Some(version)) => Some((id, version, r)),
                _ => {
                    mm.add(rec, format!("{what}: 201 without id/version: {}", r.text));
                    None
                }
            }
        }
        other => {
            rec.error(&status_kind(&other), other.as_ref().ok().map(|r| r.latency));
            None
        }
    }
}

/// Reads `path` with `X-Min-Version: version`, retrying 503 (not yet visible) up to `attempts` times.
async fn read_back(
    gw: &Gateway,
    rec: &Recorder,
    path: &str,
    version: u64,
) -> Result<Value, String> {
    for _ in 0..6 {
        let r = gw.get_waiting(path, Some(version), Some(8)).await;
        match r {
            Ok(r) if r.ok() => {
                rec.ok(r.latency);
                return Ok(r.body);
            }
            Ok(r) if r.status.as_u16() == 503 => rec.error("retry-503", Some(r.latency)),
            other => {
                rec.error(&status_kind(&other), other.as_ref().ok().map(|r| r.latency));
                return Err(format!(
                    "GET {path}: {}",
                    other.map_or_else(|e| e.to_string(), |r| format!("{} {}", r.status, r.text))
                ));
            }
        }
    }
    Err(format!(
        "GET {path}: not visible at version {version} after 6 waits"
    ))
}

fn check(m: &Mismatches, rec: &Recorder, what: &str, got: &Value, want: &Value) -> bool {
    if got == want {
        true
    } else {
        m.add(rec, format!("{what}: got {got}, want {want}"));
        false
    }
}

/// Runs the scenario against the gateway `gw`.
pub async fn run(gw: &Gateway, o: &SeedOptions) -> Result<SeedReport, E2eError> {
    let t0 = Instant::now();
    let run_id = format!("{:08x}", rand::random::<u32>());
    let mm = Arc::new(Mismatches::default());
    let mut phases = Vec::new();
    let mut rng = StdRng::seed_from_u64(o.seed);

    // Users.
    let (users, s) = run_phase(
        "create users",
        o.users,
        o.concurrency,
        o.progress,
        |i, rec| {
            let gw = gw.clone();
            let body = user_body(&run_id, i);
            let mm = mm.clone();
            async move {
                let (id, version, r) =
                    create(&gw, &rec, &mm, "/user", &format!("user {i}"), &body).await?;
                check(
                    &mm,
                    &rec,
                    &format!("user {id} email (write)"),
                    &r.body["email"],
                    &body["email"],
                );
                if r.body.get("password").is_some() || r.text.contains("argon2") {
                    mm.add(
                        &rec,
                        format!("user {id}: password material in the response"),
                    );
                }
                Some(UserRec {
                    id,
                    email: body["email"].as_str().unwrap_or_default().to_owned(),
                    name: body["name"].as_str().map(str::to_owned),
                    version,
                })
            }
        },
    )
    .await;
    phases.push(s);
    let users: Vec<UserRec> = users.into_iter().flatten().collect();

    // Products.
    let prices: Vec<i64> = (0..o.products)
        .map(|_| rng.random_range(1..=250_000))
        .collect();
    let (products, s) = run_phase(
        "create products",
        o.products,
        o.concurrency,
        o.progress,
        |i, rec| {
            let gw = gw.clone();
            let body = product_body(&run_id, i, prices[i]);
            let cents = prices[i];
            let mm = mm.clone();
            async move {
                let (id, version, r) =
                    create(&gw, &rec, &mm, "/product", &format!("product {i}"), &body).await?;
                check(
                    &mm,
                    &rec,
                    &format!("product {id} priceCents (write)"),
                    &r.body["priceCents"],
                    &json!(cents),
                );
                Some(ProductRec {
                    id,
                    name: body["name"].as_str().unwrap_or_default().to_owned(),
                    price_cents: cents,
                    description: body["description"].as_str().map(str::to_owned),
                    version,
                })
            }
        },
    )
    .await;
    phases.push(s);
    let products: Vec<ProductRec> = products.into_iter().flatten().collect();

    // Orders: random users and products.
    let n_orders = if users.is_empty() || products.is_empty() {
        0
    } else {
        o.orders
    };
    let plans: Vec<(usize, Vec<(usize, u32)>)> = (0..n_orders)
        .map(|_| {
            let u = rng.random_range(0..users.len());
            let k = rng.random_range(1..=o.max_items.max(1));
            let items = (0..k)
                .map(|_| {
                    (
                        rng.random_range(0..products.len()),
                        rng.random_range(1..=5u32),
                    )
                })
                .collect();
            (u, items)
        })
        .collect();
    let (orders, s) = run_phase("create orders", n_orders, o.concurrency, o.progress, |i, rec| {
        let gw = gw.clone();
        let (u, items) = plans[i].clone();
        let body = json!({
            "userId": users[u].id,
            "items": items.iter().map(|(p, q)| json!({"productId": products[*p].id, "quantity": q})).collect::<Vec<_>>(),
        });
        let total: i64 = items.iter().map(|(p, q)| products[*p].price_cents * i64::from(*q)).sum();
        let mm = mm.clone();
        async move {
            let (id, version, r) = create(&gw, &rec, &mm, "/order", &format!("order {i}"), &body).await?;
            check(&mm, &rec, &format!("order {id} totalCents (write)"), &r.body["totalCents"], &json!(total));
            Some(OrderRec { id, user: u, items, version })
        }
    })
    .await;
    phases.push(s);
    let orders: Vec<OrderRec> = orders.into_iter().flatten().collect();
    let write_seconds = t0.elapsed().as_secs_f64();

    // Read back every record.
    let ctx = VerifyCtx {
        gw,
        mm: &mm,
        concurrency: o.concurrency,
        progress: o.progress,
        mode: o.verify,
    };
    let check_u = |rec: &Recorder, u: &UserRec, b: &Value| check_user(&mm, rec, u, b);
    let check_p = |rec: &Recorder, p: &ProductRec, b: &Value| check_product(&mm, rec, p, b);
    let check_o = |rec: &Recorder, ord: &OrderRec, b: &Value| {
        check_order(&mm, rec, ord, &users, &products, b)
    };
    match o.verify {
        VerifyMode::Each => {
            phases.push(verify(&ctx, "verify users", "/user", &users, check_u).await);
            phases.push(verify(&ctx, "verify products", "/product", &products, check_p).await);
            phases.push(verify(&ctx, "verify orders", "/order", &orders, check_o).await);
        }
        VerifyMode::Pages => {
            // The three lists are paged side by side: each is one cursor chain.
            let (u, p, od) = tokio::join!(
                verify(&ctx, "verify users", "/user", &users, check_u),
                verify(&ctx, "verify products", "/product", &products, check_p),
                verify(&ctx, "verify orders", "/order", &orders, check_o),
            );
            phases.extend([u, p, od]);
        }
    }

    // Records actually read back (a page counts the records checked on it, not itself).
    let verified = phases
        .iter()
        .filter(|p| p.phase.starts_with("verify"))
        .map(|p| p.ok)
        .sum();
    let examples = mm.examples.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(SeedReport {
        run_id,
        users: o.users,
        products: o.products,
        orders: o.orders,
        concurrency: o.concurrency,
        verify: o.verify,
        phases,
        write_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        verified,
        mismatches: mm.count.load(Ordering::Relaxed),
        mismatch_examples: examples,
    })
}

/// How the scenario reads its records back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// One `GET /<entity>/<id>` per record with `X-Min-Version` (read-your-writes per record).
    #[default]
    Each,
    /// Every list page (`GET /<entity>?limit=500`, cursor after cursor) with each record found checked; every
    /// record not (yet) on a page at its acknowledged version is then read with `GET /<entity>/<id>` and
    /// `X-Min-Version`, so read-your-writes still holds for each one. Latencies are per page.
    Pages,
}

/// A record the scenario wrote and can find again.
trait Written: Clone + Send + Sync {
    fn id(&self) -> &str;
    fn version(&self) -> u64;
}

impl Written for UserRec {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Written for ProductRec {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Written for OrderRec {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u64 {
        self.version
    }
}

struct VerifyCtx<'a> {
    gw: &'a Gateway,
    mm: &'a Mismatches,
    concurrency: usize,
    progress: bool,
    mode: VerifyMode,
}

/// Reads every record of `records` back from `path` (`/user`, …) in the context's mode and checks it.
async fn verify<R, C>(
    cx: &VerifyCtx<'_>,
    name: &str,
    path: &str,
    records: &[R],
    check: C,
) -> PhaseSummary
where
    R: Written,
    C: Fn(&Recorder, &R, &Value),
{
    let rec = Arc::new(Recorder::new(name));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let prog = cx.progress.then(|| {
        let r = rec.clone();
        tokio::spawn(progress(
            name.to_owned(),
            records.len() as u64,
            move || r.done(),
            stop_rx,
        ))
    });
    let mut pending: Vec<&R> = records.iter().collect();
    if cx.mode == VerifyMode::Pages {
        match verify_pages(cx, &rec, path, records, &check).await {
            Ok(seen) => {
                pending = records
                    .iter()
                    .zip(&seen)
                    .filter(|(_, s)| !**s)
                    .map(|(r, _)| r)
                    .collect();
            }
            Err(e) => cx.mm.add(&rec, format!("{path} list: {e}")),
        }
    }
    // Each remaining record on its own, waiting for its acknowledged version.
    futures::stream::iter(pending)
        .map(|r| {
            let rec = rec.clone();
            let check = &check;
            async move {
                let p = format!("{path}/{}", r.id());
                match read_back(cx.gw, &rec, &p, r.version()).await {
                    Ok(b) => check(&rec, r, &b),
                    Err(e) => cx.mm.add(&rec, e),
                }
            }
        })
        .buffer_unordered(cx.concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
    rec.finish();
    let _ = stop_tx.send(true);
    if let Some(p) = prog {
        let _ = p.await;
    }
    rec.summary()
}

/// Pages through `path` once; checks each of `records` found at its acknowledged version and says which were.
async fn verify_pages<R, C>(
    cx: &VerifyCtx<'_>,
    rec: &Recorder,
    path: &str,
    records: &[R],
    check: &C,
) -> Result<Vec<bool>, String>
where
    R: Written,
    C: Fn(&Recorder, &R, &Value),
{
    let index: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id(), i))
        .collect();
    let mut seen = vec![false; records.len()];
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}?limit=500&cursor={c}"),
            None => format!("{path}?limit=500"),
        };
        let r = cx.gw.get(&url, None).await;
        let r = match r {
            Ok(r) if r.ok() => r,
            other => {
                rec.error(&status_kind(&other), other.as_ref().ok().map(|r| r.latency));
                return Err(
                    other.map_or_else(|e| e.to_string(), |r| format!("{} {}", r.status, r.text))
                );
            }
        };
        let mut found = 0u64;
        for item in r.body["items"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Some(&i) = item["id"].as_str().and_then(|id| index.get(id)) else {
                continue; // another run's record
            };
            // An older version than acknowledged is not a verdict yet: the per-record read below waits for it.
            if item["version"].as_u64() == Some(records[i].version()) && !seen[i] {
                check(rec, &records[i], item);
                seen[i] = true;
                found += 1;
            }
        }
        rec.ok_many(found, r.latency);
        match r.body["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(seen),
        }
    }
}

fn check_user(mm: &Mismatches, rec: &Recorder, u: &UserRec, b: &Value) {
    let w = format!("user {}", u.id);
    check(mm, rec, &format!("{w} id"), &b["id"], &json!(u.id));
    check(mm, rec, &format!("{w} email"), &b["email"], &json!(u.email));
    check(mm, rec, &format!("{w} name"), &b["name"], &json!(u.name));
    check(
        mm,
        rec,
        &format!("{w} version"),
        &b["version"],
        &json!(u.version),
    );
    if b.get("password").is_some() || b.get("passwordHash").is_some() {
        mm.add(rec, format!("{w}: password material in the read model"));
    }
}

fn check_product(mm: &Mismatches, rec: &Recorder, p: &ProductRec, b: &Value) {
    let w = format!("product {}", p.id);
    check(mm, rec, &format!("{w} id"), &b["id"], &json!(p.id));
    check(mm, rec, &format!("{w} name"), &b["name"], &json!(p.name));
    check(
        mm,
        rec,
        &format!("{w} priceCents"),
        &b["priceCents"],
        &json!(p.price_cents),
    );
    check(
        mm,
        rec,
        &format!("{w} price"),
        &b["price"],
        &json!(format_cents(p.price_cents)),
    );
    check(
        mm,
        rec,
        &format!("{w} description"),
        &b["description"],
        &json!(p.description),
    );
    check(
        mm,
        rec,
        &format!("{w} version"),
        &b["version"],
        &json!(p.version),
    );
}

fn check_order(
    mm: &Mismatches,
    rec: &Recorder,
    ord: &OrderRec,
    users: &[UserRec],
    products: &[ProductRec],
    b: &Value,
) {
    let w = format!("order {}", ord.id);
    check(mm, rec, &format!("{w} id"), &b["id"], &json!(ord.id));
    let Some(user) = users.get(ord.user) else {
        mm.add(rec, format!("{w}: unknown user index {}", ord.user));
        return;
    };
    check(
        mm,
        rec,
        &format!("{w} user.id"),
        &b["user"]["id"],
        &json!(user.id),
    );
    check(
        mm,
        rec,
        &format!("{w} user.email"),
        &b["user"]["email"],
        &json!(user.email),
    );
    check(
        mm,
        rec,
        &format!("{w} user.name"),
        &b["user"]["name"],
        &json!(user.name),
    );
    let items = b["items"].as_array().map(Vec::as_slice).unwrap_or_default();
    if items.len() != ord.items.len() {
        mm.add(
            rec,
            format!("{w}: {} items, want {}", items.len(), ord.items.len()),
        );
        return;
    }
    let mut total = 0i64;
    for (k, (it, (pi, q))) in items.iter().zip(&ord.items).enumerate() {
        let Some(p) = products.get(*pi) else {
            mm.add(rec, format!("{w}: unknown product index {pi}"));
            return;
        };
        let line = p.price_cents * i64::from(*q);
        total += line;
        check(
            mm,
            rec,
            &format!("{w} items[{k}].productId"),
            &it["productId"],
            &json!(p.id),
        );
        check(
            mm,
            rec,
            &format!("{w} items[{k}].productName"),
            &it["productName"],
            &json!(p.name),
        );
        check(
            mm,
            rec,
            &format!("{w} items[{k}].unitPriceCents"),
            &it["unitPriceCents"],
            &json!(p.price_cents),
        );
        check(
            mm,
            rec,
            &format!("{w} items[{k}].quantity"),
            &it["quantity"],
            &json!(q),
        );
        check(
            mm,
            rec,
            &format!("{w} items[{k}].lineTotalCents"),
            &it["lineTotalCents"],
            &json!(line),
        );
    }
    check(
        mm,
        rec,
        &format!("{w} totalCents"),
        &b["totalCents"],
        &json!(total),
    );
    check(
        mm,
        rec,
        &format!("{w} total"),
        &b["total"],
        &json!(format_cents(total)),
    );
    check(
        mm,
        rec,
        &format!("{w} version"),
        &b["version"],
        &json!(ord.version),
    );
}

/// Waits up to `timeout` for `/sync-status` to say `caughtUp` (after a run, before counting).
pub async fn settle(gw: &Gateway, timeout: Duration) -> Result<Duration, E2eError> {
    gw.wait_caught_up(timeout).await
}
