// The migrations are embedded at compile time: rebuild when one is added or changed.
//
// The dashboard's files (dashboard/dist, built by npm) are embedded by rust-embed, which
// resolves the folder when this crate compiles: if it does not exist yet (a fresh clone, where
// the OpenAPI document the web client is generated from is printed by a binary of this
// workspace), a debug build would never find the files written there later. An empty folder
// is made first, so the path resolves and the files are read once npm has built them.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboard/dist");
    if let Err(e) = std::fs::create_dir_all(&dist) {
        println!("cargo:warning=could not create {}: {e}", dist.display());
    }
}
