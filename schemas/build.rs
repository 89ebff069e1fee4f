//! Compiles `proto/tether.proto` with protox (pure Rust, no system `protoc`) and
//! generates the prost types into `OUT_DIR/tether.v1.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tether.proto");
    let fds = protox::compile(["proto/tether.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // Sorted maps make encoding deterministic: the same `Down` always gives the
        // same bytes, which test vectors and encode-once broadcast rely on.
        .btree_map(["."])
        // prost derives `Eq` itself except for messages with repeated/map fields; none
        // of ours holds a float, so these can be `Eq` too (and so can `Frame`).
        .message_attribute(".tether.v1.Login", "#[derive(Eq)]")
        .message_attribute(".tether.v1.Down", "#[derive(Eq)]")
        .compile_fds(fds)?;
    Ok(())
}
