//! Writes the event JSON Schemas into `crates/events/schemas/` (checked in; drift-tested).
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
    std::fs::create_dir_all(&dir)?;
    for (name, text) in cqrs_events::schema::all() {
        std::fs::write(dir.join(&name), text)?;
        println!("wrote schemas/{name}");
    }
    Ok(())
}
