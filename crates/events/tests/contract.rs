#![allow(clippy::unwrap_used)]
use cqrs_events::*;
use serde_json::json;
use uuid::Uuid;

fn samples() -> Vec<EventPayload> {
    let uid = Uuid::now_v7();
    vec![
        EventPayload::UserCreated(UserCreated {
            email: "a@b.co".into(),
            name: Some("A".into()),
        }),
        EventPayload::UserUpdated(UserUpdated {
            email: "c@b.co".into(),
            name: None,
        }),
        EventPayload::UserDeleted(UserDeleted {}),
        EventPayload::ProductCreated(ProductCreated {
            name: "P".into(),
            price_cents: 1999,
            description: None,
        }),
        EventPayload::ProductUpdated(ProductUpdated {
            name: "P2".into(),
            price_cents: 2500,
            description: Some("d".into()),
        }),
        EventPayload::ProductDeleted(ProductDeleted {}),
        EventPayload::OrderCreated(OrderCreated {
            user: OrderUser {
                id: uid,
                email: "a@b.co".into(),
                name: None,
            },
            items: vec![OrderItem {
                product_id: Uuid::now_v7(),
                product_name: "P".into(),
                unit_price_cents: 1999,
                quantity: 2,
                line_total_cents: 3998,
            }],
            total_cents: 3998,
        }),
        EventPayload::OrderCancelled(OrderCancelled {
            reason: Some("changed mind".into()),
        }),
    ]
}

#[test]
fn every_event_type_round_trips_through_json() {
    let all = samples();
    assert_eq!(all.len(), EventType::ALL.len());
    for p in all {
        let e = Envelope::new(Uuid::now_v7(), 3, p.clone());
        let bytes = e.to_json();
        let back = decode(&bytes).unwrap();
        assert_eq!(back, e);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], p.event_type().as_str());
        assert!(
            v["data"].is_object(),
            "data must be an object, not a string: {v}"
        );
        assert_eq!(v["aggregateType"], p.event_type().aggregate_type().as_str());
        assert_eq!(v["schemaVersion"], 1);
    }
}

#[test]
fn envelope_wire_shape_matches_the_design() {
    let id = Uuid::now_v7();
    let raw = json!({"id": Uuid::now_v7(), "type": "PRODUCT-CREATED", "schemaVersion": 1,
        "aggregateType": "product", "aggregateId": id, "version": 1,
        "occurredAt": "2026-11-24T12:34:56.789Z", "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
        "causationId": "req-1", "data": {"name": "Lamp", "priceCents": 1250, "description": null}});
    let e = decode(raw.to_string().as_bytes()).unwrap();
    assert_eq!(e.aggregate_id, id);
    assert_eq!(e.causation_id.as_deref(), Some("req-1"));
    match e.payload {
        EventPayload::ProductCreated(p) => assert_eq!(p.price_cents, 1250),
        other => panic!("wrong payload {other:?}"),
    }
}

#[test]
fn decode_rejects_what_must_go_to_the_dlq() {
    let base = |t: &str, agg: &str, sv: u32, data: serde_json::Value| {
        json!({"id": Uuid::now_v7(), "type": t, "schemaVersion": sv, "aggregateType": agg,
            "aggregateId": Uuid::now_v7(), "version": 1, "occurredAt": "2026-11-24T12:00:00Z", "data": data})
        .to_string()
    };
    assert!(matches!(
        decode(b"not json"),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode(base("USER-EXPLODED", "user", 1, json!({})).as_bytes()),
        Err(DecodeError::UnknownType(_))
    ));
    assert!(matches!(
        decode(base("USER-CREATED", "user", 9, json!({"email": "a@b.c"})).as_bytes()),
        Err(DecodeError::SchemaVersion(_))
    ));
    assert!(matches!(
        decode(base("USER-CREATED", "user", 1, json!({"email": 5})).as_bytes()),
        Err(DecodeError::InvalidPayload { .. })
    ));
    assert!(matches!(
        decode(base("USER-CREATED", "order", 1, json!({"email": "a@b.c"})).as_bytes()),
        Err(DecodeError::AggregateMismatch { .. })
    ));
    // The seed's double-encoded data (a JSON string) is not accepted.
    assert!(
        decode(base("USER-CREATED", "user", 1, json!("{\"email\":\"a@b.c\"}")).as_bytes()).is_err()
    );
    // A password smuggled into a payload is rejected, never carried along.
    assert!(matches!(
        decode(
            base(
                "USER-CREATED",
                "user",
                1,
                json!({"email": "a@b.c", "password": "x"})
            )
            .as_bytes()
        ),
        Err(DecodeError::InvalidPayload { .. })
    ));
}

#[test]
fn topics_are_per_aggregate_type() {
    let t = Topics::new("t1");
    assert_eq!(t.for_aggregate(AggregateType::Order), "t1.orders");
    assert_eq!(t.dlq(), "t1.dlq");
    assert_eq!(t.aggregate_of("t1.users"), Some(AggregateType::User));
    assert_eq!(t.aggregate_of("t1.USER-CREATED"), None);
    assert_eq!(t.event_topics().len(), 3);
}

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut expected: Vec<String> = Vec::new();
    for (name, text) in schema::all() {
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|_| {
            panic!("schemas/{name} missing: run `cargo run -p cqrs-events --bin gen-schemas`")
        });
        assert_eq!(
            on_disk, text,
            "schemas/{name} drifted: run `cargo run -p cqrs-events --bin gen-schemas`"
        );
        expected.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(present, expected, "stale schema files in schemas/");
}

#[test]
fn no_schema_has_a_password_or_hash_field() {
    fn field_names(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Object(props)) = m.get("properties") {
                    out.extend(props.keys().cloned());
                }
                m.values().for_each(|c| field_names(c, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| field_names(c, out)),
            _ => {}
        }
    }
    let mut seen = Vec::new();
    for (name, text) in schema::all() {
        let mut fields = Vec::new();
        field_names(&serde_json::from_str(&text).unwrap(), &mut fields);
        seen.extend(fields.clone());
        for f in fields {
            let f = f.to_lowercase();
            assert!(
                !f.contains("password") && !f.contains("hash"),
                "{name} has field {f}"
            );
        }
    }
    // The walk really finds fields (else this test could never fail).
    assert!(
        seen.iter().any(|f| f == "email") && seen.iter().any(|f| f == "priceCents"),
        "{seen:?}"
    );
}
