//! One snapshot of the stable text dump per shipped model: any change in import, constant
//! handling or dump formatting shows up as a reviewed diff.

mod common;

#[test]
fn dump_of_each_shipped_model() {
    insta::glob!("../models", "*.onnx", |path| {
        let model = onnxq::onnx::load_model(path).unwrap();
        insta::assert_snapshot!(model.to_string());
    });
}
