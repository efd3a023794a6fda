//! Read models: how an event turns a document into its next state, and how a document is shown to clients.
//!
//! Documents are plain BSON with `_id` = the aggregate id as a hyphenated UUID string, `version` = the version
//! of the last applied event and `lastEventId`. A deleted user/product is kept as a *tombstone*
//! (`deleted: true`, its `version`, no other fields), so a late duplicate of an older event cannot resurrect
//! it: the version guard still sees the tombstone's version. Reads answer 404 for a tombstone.

use chrono::SecondsFormat;
use cqrs_events::{AggregateType, Envelope, EventPayload};
use mongodb::bson::{Bson, Document, doc};

/// Formats integer cents as a decimal string: 1999 → "19.99", -5 → "-0.05".
pub fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Checks what the type system cannot: an event that passes here can be applied. Errors become the DLQ reason.
pub fn validate(env: &Envelope) -> Result<(), String> {
    let creating = matches!(
        env.payload,
        EventPayload::UserCreated(_)
            | EventPayload::ProductCreated(_)
            | EventPayload::OrderCreated(_)
    );
    if creating && env.version != 1 {
        return Err(format!(
            "{} must have version 1, has {}",
            env.event_type(),
            env.version
        ));
    }
    if !creating && env.version < 2 {
        return Err(format!(
            "{} must have a version above 1, has {}",
            env.event_type(),
            env.version
        ));
    }
    match &env.payload {
        EventPayload::UserCreated(u) => check_email(&u.email),
        EventPayload::UserUpdated(u) => check_email(&u.email),
        EventPayload::ProductCreated(p) => check_product(&p.name, p.price_cents),
        EventPayload::ProductUpdated(p) => check_product(&p.name, p.price_cents),
        EventPayload::OrderCreated(o) => {
            if o.items.is_empty() {
                return Err("order has no items".into());
            }
            let mut sum: i64 = 0;
            for (i, it) in o.items.iter().enumerate() {
                if it.quantity == 0 {
                    return Err(format!("item {i}: quantity must be positive"));
                }
                if it.unit_price_cents < 0 {
                    return Err(format!("item {i}: negative unit price"));
                }
                let line = it.unit_price_cents.checked_mul(i64::from(it.quantity));
                if line != Some(it.line_total_cents) {
                    return Err(format!(
                        "item {i}: lineTotalCents is not unitPriceCents × quantity"
                    ));
                }
                sum = sum
                    .checked_add(it.line_total_cents)
                    .ok_or("total overflows")?;
            }
            if sum != o.total_cents {
                return Err(format!(
                    "totalCents {} is not the sum of the lines {sum}",
                    o.total_cents
                ));
            }
            check_email(&o.user.email)
        }
        EventPayload::UserDeleted(_)
        | EventPayload::ProductDeleted(_)
        | EventPayload::OrderCancelled(_) => Ok(()),
    }
}

fn check_email(email: &str) -> Result<(), String> {
    if email.trim().is_empty() || !email.contains('@') {
        Err(format!("invalid email {email:?}"))
    } else {
        Ok(())
    }
}

fn check_product(name: &str, price_cents: i64) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("product name is empty".into());
    }
    if price_cents < 0 {
        return Err(format!("negative price {price_cents}"));
    }
    Ok(())
}

fn opt_str(s: &Option<String>) -> Bson {
    s.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()))
}

/// Applies `env` (whose version is exactly `base.version + 1`, or 1 with no base) and returns the new document.
/// Errors (an event that makes no sense on this state, e.g. an update of a deleted user) go to the DLQ.
pub fn apply(base: Option<&Document>, env: &Envelope) -> Result<Document, String> {
    let at = env.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let id = env.aggregate_id.to_string();
    if base
        .and_then(|b| b.get_bool("deleted").ok())
        .unwrap_or(false)
    {
        return Err(format!(
            "{} on a deleted {}",
            env.event_type(),
            env.aggregate_type
        ));
    }
    let created_at = base
        .and_then(|b| b.get_str("createdAt").ok())
        .unwrap_or(&at)
        .to_owned();
    let meta = doc! {
        "version": env.version as i64,
        "lastEventId": env.id.to_string(),
        "createdAt": created_at.clone(),
        "updatedAt": at.clone(),
    };
    let mut d = match &env.payload {
        EventPayload::UserCreated(cqrs_events::UserCreated { email, name })
        | EventPayload::UserUpdated(cqrs_events::UserUpdated { email, name }) => {
            doc! {"_id": &id, "email": email, "name": opt_str(name)}
        }
        EventPayload::ProductCreated(cqrs_events::ProductCreated {
            name,
            price_cents,
            description,
        })
        | EventPayload::ProductUpdated(cqrs_events::ProductUpdated {
            name,
            price_cents,
            description,
        }) => doc! {
            "_id": &id, "name": name, "price": format_cents(*price_cents), "priceCents": *price_cents,
            "description": opt_str(description),
        },
        EventPayload::UserDeleted(_) | EventPayload::ProductDeleted(_) => {
            doc! {"_id": &id, "deleted": true, "deletedAt": at.clone()}
        }
        EventPayload::OrderCreated(o) => {
            let items: Vec<Bson> = o
                .items
                .iter()
                .map(|it| {
                    Bson::Document(doc! {
                        "productId": it.product_id.to_string(),
                        "productName": &it.product_name,
                        "unitPriceCents": it.unit_price_cents,
                        "unitPrice": format_cents(it.unit_price_cents),
                        "quantity": i64::from(it.quantity),
                        "lineTotalCents": it.line_total_cents,
                        "lineTotal": format_cents(it.line_total_cents),
                    })
                })
                .collect();
            doc! {
                "_id": &id,
                "userId": o.user.id.to_string(),
                "user": {"id": o.user.id.to_string(), "email": &o.user.email, "name": opt_str(&o.user.name)},
                "items": items,
                "totalCents": o.total_cents,
                "total": format_cents(o.total_cents),
                "status": "CREATED",
            }
        }
        EventPayload::OrderCancelled(c) => {
            let Some(b) = base else {
                return Err("ORDER-CANCELLED for an order that does not exist".into());
            };
            let mut d = b.clone();
            d.insert("status", "CANCELLED");
            d.insert("cancelReason", opt_str(&c.reason));
            d.insert("cancelledAt", at.clone());
            d
        }
    };
    d.extend(meta);
    Ok(d)
}

/// The document as a client sees it (`_id` → `id`), or `None` for a tombstone.
pub fn to_json(d: &Document) -> Option<serde_json::Value> {
    if d.get_bool("deleted").unwrap_or(false) {
        return None;
    }
    let mut out = serde_json::Map::new();
    for (k, v) in d {
        let key = if k == "_id" {
            "id".to_owned()
        } else {
            k.clone()
        };
        out.insert(key, v.clone().into_relaxed_extjson());
    }
    Some(serde_json::Value::Object(out))
}

pub fn doc_version(d: &Document) -> u64 {
    match d.get("version") {
        Some(Bson::Int64(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Bson::Int32(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Bson::Double(v)) if *v >= 0.0 => *v as u64,
        _ => 0,
    }
}

/// The collection of a read model in a projection generation: `users_g1`, `products_g2`, …
pub fn collection_name(entity: AggregateType, generation: u32) -> String {
    format!("{}_g{generation}", entity.plural())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cqrs_events::{OrderCreated, OrderItem, OrderUser, ProductCreated, UserDeleted};
    use uuid::Uuid;

    #[test]
    fn cents_format() {
        assert_eq!(format_cents(1999), "19.99");
        assert_eq!(format_cents(5), "0.05");
        assert_eq!(format_cents(0), "0.00");
        assert_eq!(format_cents(-105), "-1.05");
    }

    #[test]
    fn product_and_tombstone() {
        let id = Uuid::new_v4();
        let e1 = Envelope::new(
            id,
            1,
            EventPayload::ProductCreated(ProductCreated {
                name: "P".into(),
                price_cents: 1999,
                description: None,
            }),
        );
        validate(&e1).unwrap();
        let d1 = apply(None, &e1).unwrap();
        assert_eq!(d1.get_str("price").unwrap(), "19.99");
        assert_eq!(doc_version(&d1), 1);
        let e2 = Envelope::new(id, 2, EventPayload::ProductDeleted(Default::default()));
        let d2 = apply(Some(&d1), &e2).unwrap();
        assert!(to_json(&d2).is_none());
        assert_eq!(doc_version(&d2), 2);
        let e3 = Envelope::new(id, 3, EventPayload::UserDeleted(UserDeleted {}));
        assert!(apply(Some(&d2), &e3).is_err());
    }

    #[test]
    fn order_validation() {
        let item = OrderItem {
            product_id: Uuid::new_v4(),
            product_name: "x".into(),
            unit_price_cents: 250,
            quantity: 2,
            line_total_cents: 500,
        };
        let user = OrderUser {
            id: Uuid::new_v4(),
            email: "a@b.c".into(),
            name: None,
        };
        let ok = OrderCreated {
            user: user.clone(),
            items: vec![item.clone()],
            total_cents: 500,
        };
        let e = Envelope::new(Uuid::new_v4(), 1, EventPayload::OrderCreated(ok));
        validate(&e).unwrap();
        let j = to_json(&apply(None, &e).unwrap()).unwrap();
        assert_eq!(j["total"], "5.00");
        assert_eq!(j["status"], "CREATED");
        let bad = OrderCreated {
            user,
            items: vec![item],
            total_cents: 501,
        };
        assert!(
            validate(&Envelope::new(
                Uuid::new_v4(),
                1,
                EventPayload::OrderCreated(bad)
            ))
            .is_err()
        );
    }
}
