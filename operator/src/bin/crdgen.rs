//! Prints the CqrsStack CRD as YAML (`cargo run -p cqrs-operator --bin crdgen > file`).
fn main() -> anyhow::Result<()> {
    print!("{}", cqrs_operator::crd::crd_yaml()?);
    Ok(())
}
