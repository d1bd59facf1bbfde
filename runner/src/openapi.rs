//! Prints the API's OpenAPI document (the one served at `/api/openapi.json`)
//! to stdout, so the TypeScript client can be generated from it without a
//! running server.

fn main() -> anyhow::Result<()> {
    println!("{}", offload::api::openapi().to_pretty_json()?);
    Ok(())
}
