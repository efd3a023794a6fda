//! `scenario seed`: the seed's request bodies at scale, then every record read back through the gateway with
//! read-your-writes and compared field by field with what the server must have computed.

use std::{
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
    pub phases: Vec<PhaseSummary>,
    pub write_seconds: f64,
    pub total_seconds: f64,
    /// Records written (acknowledged) and then verified.
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
            "seed {}: {} users, {} products, {} orders, concurrency {}",
            self.run_id, self.users, self.products, self.orders, self.concurrency
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
                let r = gw.post("/user", &body).await;
                match r {
                    Ok(r) if r.status.as_u16() == 201 => {
                        rec.ok(r.latency);
                        let (Some(id), Some(version)) = (r.id(), r.version()) else {
                            mm.add(
                                &rec,
                                format!("user {i}: 201 without id/version: {}", r.text),
                            );
                            return None;
                        };
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
                    other => {
                        rec.error(&status_kind(&other), other.as_ref().ok().map(|r| r.latency));
                        None
                    }
                }
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
                let r = gw.post("/product", &body).await;
                match r {
                    Ok(r) if r.status.as_u16() == 201 => {
                        rec.ok(r.latency);
                        let (Some(id), Some(version)) = (r.id(), r.version()) else {
                            mm.add(
                                &rec,
                                format!("product {i}: 201 without id/version: {}", r.text),
                            );
                            return None;
                        };
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
                    other => {
                        rec.error(&status_kind(&other), other.as_ref().ok().map(|r| r.latency));
                        None
                    }
                }
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
            let r = gw.post("/order", &body).await;
            match r {
                Ok(r) if r.status.as_u16() == 201 => {
                    rec.ok(r.latency);
                    let (Some(id), Some(version)) = (r.id(), r.version()) else {
                        mm.add(&rec, format!("order {i}: 201 without id/version: {}", r.text));
                        return None;
                    };
                    check(&mm, &rec, &format!("order {id} totalCents (write)"), &r.body["totalCents"], &json!(total));
                    Some(OrderRec { id, user: u, items, version })
                }
                other => {
                    rec.error(&status_kind(&other), other.as_ref().ok().map(|r| r.latency));
                    None
                }
            }
        }
    })
    .await;
    phases.push(s);
    let orders: Vec<OrderRec> = orders.into_iter().flatten().collect();
    let write_seconds = t0.elapsed().as_secs_f64();

    // Read back every record.
    let (_, s) = run_phase(
        "verify users",
        users.len(),
        o.concurrency,
        o.progress,
        |i, rec| {
            let gw = gw.clone();
            let u = users[i].clone();
            let mm = mm.clone();
            async move {
                match read_back(&gw, &rec, &format!("/user/{}", u.id), u.version).await {
                    Ok(b) => {
                        let w = format!("user {}", u.id);
                        check(&mm, &rec, &format!("{w} id"), &b["id"], &json!(u.id));
                        check(
                            &mm,
                            &rec,
                            &format!("{w} email"),
                            &b["email"],
                            &json!(u.email),
                        );
                        check(&mm, &rec, &format!("{w} name"), &b["name"], &json!(u.name));
                        check(
                            &mm,
                            &rec,
                            &format!("{w} version"),
                            &b["version"],
                            &json!(u.version),
                        );
                        if b.get("password").is_some() || b.get("passwordHash").is_some() {
                            mm.add(&rec, format!("{w}: password material in the read model"));
                        }
                    }
                    Err(e) => mm.add(&rec, e),
                }
                Some(())
            }
        },
    )
    .await;
    phases.push(s);
    let (_, s) = run_phase(
        "verify products",
        products.len(),
        o.concurrency,
        o.progress,
        |i, rec| {
            let gw = gw.clone();
            let p = products[i].clone();
            let mm = mm.clone();
            async move {
                match read_back(&gw, &rec, &format!("/product/{}", p.id), p.version).await {
                    Ok(b) => {
                        let w = format!("product {}", p.id);
                        check(&mm, &rec, &format!("{w} name"), &b["name"], &json!(p.name));
                        check(
                            &mm,
                            &rec,
                            &format!("{w} priceCents"),
                            &b["priceCents"],
                            &json!(p.price_cents),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} price"),
                            &b["price"],
                            &json!(format_cents(p.price_cents)),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} description"),
                            &b["description"],
                            &json!(p.description),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} version"),
                            &b["version"],
                            &json!(p.version),
                        );
                    }
                    Err(e) => mm.add(&rec, e),
                }
                Some(())
            }
        },
    )
    .await;
    phases.push(s);
    let (_, s) = run_phase(
        "verify orders",
        orders.len(),
        o.concurrency,
        o.progress,
        |i, rec| {
            let gw = gw.clone();
            let ord = orders[i].clone();
            let user = users[ord.user].clone();
            let lines: Vec<(ProductRec, u32)> = ord
                .items
                .iter()
                .map(|(p, q)| (products[*p].clone(), *q))
                .collect();
            let mm = mm.clone();
            async move {
                match read_back(&gw, &rec, &format!("/order/{}", ord.id), ord.version).await {
                    Ok(b) => {
                        let w = format!("order {}", ord.id);
                        check(
                            &mm,
                            &rec,
                            &format!("{w} user.id"),
                            &b["user"]["id"],
                            &json!(user.id),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} user.email"),
                            &b["user"]["email"],
                            &json!(user.email),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} user.name"),
                            &b["user"]["name"],
                            &json!(user.name),
                        );
                        let items = b["items"].as_array().cloned().unwrap_or_default();
                        if items.len() != lines.len() {
                            mm.add(
                                &rec,
                                format!("{w}: {} items, want {}", items.len(), lines.len()),
                            );
                        } else {
                            for (k, (it, (p, q))) in items.iter().zip(&lines).enumerate() {
                                let line = p.price_cents * i64::from(*q);
                                check(
                                    &mm,
                                    &rec,
                                    &format!("{w} items[{k}].productId"),
                                    &it["productId"],
                                    &json!(p.id),
                                );
                                check(
                                    &mm,
                                    &rec,
                                    &format!("{w} items[{k}].productName"),
                                    &it["productName"],
                                    &json!(p.name),
                                );
                                check(
                                    &mm,
                                    &rec,
                                    &format!("{w} items[{k}].unitPriceCents"),
                                    &it["unitPriceCents"],
                                    &json!(p.price_cents),
                                );
                                check(
                                    &mm,
                                    &rec,
                                    &format!("{w} items[{k}].quantity"),
                                    &it["quantity"],
                                    &json!(q),
                                );
                                check(
                                    &mm,
                                    &rec,
                                    &format!("{w} items[{k}].lineTotalCents"),
                                    &it["lineTotalCents"],
                                    &json!(line),
                                );
                            }
                        }
                        let total: i64 = lines
                            .iter()
                            .map(|(p, q)| p.price_cents * i64::from(*q))
                            .sum();
                        check(
                            &mm,
                            &rec,
                            &format!("{w} totalCents"),
                            &b["totalCents"],
                            &json!(total),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} total"),
                            &b["total"],
                            &json!(format_cents(total)),
                        );
                        check(
                            &mm,
                            &rec,
                            &format!("{w} version"),
                            &b["version"],
                            &json!(ord.version),
                        );
                    }
                    Err(e) => mm.add(&rec, e),
                }
                Some(())
            }
        },
    )
    .await;
    phases.push(s);

    let verified = (users.len() + products.len() + orders.len()) as u64;
    let examples = mm.examples.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(SeedReport {
        run_id,
        users: o.users,
        products: o.products,
        orders: o.orders,
        concurrency: o.concurrency,
        phases,
        write_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        verified,
        mismatches: mm.count.load(Ordering::Relaxed),
        mismatch_examples: examples,
    })
}

/// Waits up to `timeout` for `/sync-status` to say `caughtUp` (after a run, before counting).
pub async fn settle(gw: &Gateway, timeout: Duration) -> Result<Duration, E2eError> {
    gw.wait_caught_up(timeout).await
}
