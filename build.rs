//! Compiles proto/onnx.proto with prost-build, parsed by the pure-Rust protox (no protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"])?;
    // A tensor's raw bytes are reference-counted (`bytes::Bytes`): copies of the IR (the float
    // model kept for verification, the lowered copy, the protos handed to tract and to the
    // writer) share the weights instead of duplicating them.
    prost_build::Config::new()
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(descriptors)?;
    Ok(())
}
