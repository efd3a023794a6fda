//! Generated files must match the command that generates them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn checked_in_crds_match_crdgen() {
    let want = cqrs_operator::crd::crd_yaml().unwrap();
    for path in [
        "charts/cqrs-operator/crds/cqrsstacks.cqrs.dev.yaml",
        "manifests/crds/cqrsstacks.cqrs.dev.yaml",
    ] {
        let got = std::fs::read_to_string(root().join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}; run `just crdgen`"));
        assert!(
            got == want,
            "{path} is out of date with the Rust types; run `just crdgen`"
        );
    }
}

#[test]
fn crd_has_status_printer_columns_and_list_map_conditions() {
    let crd = serde_json::to_value(cqrs_operator::crd::crd()).unwrap();
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        [
            "Ready",
            "Gateway",
            "Mutation",
            "Query",
            "Lag",
            "Generation",
            "Age"
        ]
    );
    let conditions =
        &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    assert_eq!(crd["spec"]["scope"], "Namespaced");
}
