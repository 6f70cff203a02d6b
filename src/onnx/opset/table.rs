//! The reviewed table of redefinitions: for every (operator, opset version) at which an ONNX
//! operator was redefined, up to [`super::MAX_TARGET_OPSET`], whether a model crossing it needs
//! nothing (compatible: types added, constraints relaxed, attributes added with the old
//! behaviour as default) or a conversion (see [`super::convert`]). Reviewed
//! against the ONNX changelog and the onnx 1.23 schemas. A pair that is in neither list is
//! refused, so that a schema table regenerated with newer operators cannot slip through.

use super::listed;

/// What crossing one redefinition needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepKind {
    /// Types added, constraints relaxed, attributes added with the old behaviour as default.
    Compatible,
    /// Needs a conversion (or a check that may refuse): see `Converter::step`.
    Convert,
    /// Not reviewed: refused.
    Unknown,
}

/// Redefinitions that need nothing, by opset (reviewed against the ONNX changelog and the
/// onnx 1.23 schemas; the onnx version converter registers the same ones as compatible).
const COMPATIBLE: &[(i64, &str)] = &[
    (8, "Max MaxPool Mean Min Sum"),
    (9, "Cast Constant Flatten Gemm Greater Less MatMul PRelu"),
    (10, "AveragePool MaxPool"),
    (
        11,
        "ArgMax ArgMin AveragePool Compress Concat Constant Conv ConvTranspose DepthToSpace Equal \
         Flatten Gather Gemm Hardmax If LogSoftmax Loop LpPool MaxPool MaxUnpool \
         NonMaxSuppression OneHot ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax \
         ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Scan Slice Softmax Split \
         Squeeze TopK Unsqueeze",
    ),
    (
        12,
        "ArgMax ArgMin Clip Constant GatherND Max MaxPool Min Pow ReduceMax ReduceMin",
    ),
    (
        13,
        "Abs Add ArgMax ArgMin Cast Ceil Clip Concat Constant DepthToSpace DequantizeLinear Div \
         Dropout Equal Exp Expand Flatten Floor Gather GatherElements GatherND Gemm Greater \
         Identity If IsNaN LRN Less Log Loop MatMul Max Mean MeanVarianceNormalization Min Mod \
         Mul Neg NegativeLogLikelihoodLoss NonZero Pad Pow QuantizeLinear Reciprocal ReduceL1 \
         ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd \
         ReduceSumSquare Relu Reshape ScatterElements ScatterND Shape Sigmoid Sign Size Slice \
         SoftmaxCrossEntropyLoss SpaceToDepth Sqrt Sub Sum Tanh Tile Transpose",
    ),
    (14, "Add CumSum Div GRU Identity LSTM Mul RNN Relu Reshape Sub"),
    (15, "BatchNormalization Pow Shape"),
    (
        16,
        "GreaterOrEqual Identity If LeakyRelu LessOrEqual Loop PRelu Scan ScatterElements \
         ScatterND Where",
    ),
    (
        18,
        "LpPool OptionalGetElement OptionalHasElement Pad Resize ScatterElements ScatterND",
    ),
    (
        19,
        "AveragePool Cast CastLike Constant DequantizeLinear Equal Identity If Loop Pad \
         QuantizeLinear Reshape Resize Scan Shape Size",
    ),
    (20, "ConstantOfShape IsInf IsNaN ReduceMax ReduceMin"),
    (
        21,
        "Cast CastLike Constant ConstantOfShape DequantizeLinear Flatten Identity If Loop Pad \
         QLinearMatMul QuantizeLinear Reshape Scan Shape Size Squeeze Transpose Unsqueeze",
    ),
    // bfloat16 added to these.
    (
        22,
        "Acos Acosh Asin Asinh Atan Atanh AveragePool Bernoulli Conv ConvTranspose Cos Cosh \
         DeformConv Det Dropout Elu EyeLike GRU GlobalAveragePool GlobalLpPool GlobalMaxPool \
         GridSample HardSigmoid HardSwish InstanceNormalization LSTM LpNormalization LpPool \
         MaxPool MaxRoiPool MaxUnpool Mish Multinomial NegativeLogLikelihoodLoss RNN RandomNormal \
         RandomNormalLike RandomUniform RandomUniformLike RoiAlign Round Selu Sin Sinh Softplus \
         Softsign Tan ThresholdedRelu",
    ),
    // float4e2m1 added to these.
    (
        23,
        "Cast CastLike Constant ConstantOfShape DequantizeLinear Flatten Identity If Loop Pad \
         QuantizeLinear Reshape Scan Shape Size Squeeze Transpose Unsqueeze",
    ),
];

/// Reduce ops whose `axes` became an input at 18 (ReduceSum's did at 13).
pub(super) const REDUCE_AXES_18: &str =
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd \
    ReduceSumSquare";

/// What crossing the redefinition of `op` at opset `v` needs.
pub(super) fn step_kind(op: &str, v: i64) -> StepKind {
    let convert = matches!(
        (op, v),
        ("BatchNormalization", 9 | 14)
            | ("Upsample", 9 | 10)
            | ("Scan", 9)
            | ("Dropout", 10 | 12)
            | ("Slice", 10)
            | ("TopK", 10)
            | ("Clip", 11)
            | ("Pad", 11)
            | ("Resize", 11 | 13)
            | ("Scatter", 11)
            | ("Softmax" | "LogSoftmax" | "Hardmax", 13)
            | ("ReduceSum" | "Squeeze" | "Unsqueeze" | "Erf", 13)
            | ("Split", 13 | 18)
            | ("RoiAlign", 16)
            | ("GridSample" | "DFT", 20)
            | ("GroupNormalization", 21)
    ) || (v == 18 && listed(REDUCE_AXES_18, op));
    if convert {
        StepKind::Convert
    } else if COMPATIBLE.iter().any(|(version, ops)| *version == v && listed(ops, op)) {
        StepKind::Compatible
    } else {
        StepKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::opset::{MAX_TARGET_OPSET, MIN_SOURCE_OPSET};

    #[test]
    fn every_redefinition_up_to_the_max_target_is_classified() {
        for (domain, op, versions) in crate::onnx::schemas::SCHEMAS {
            if !domain.is_empty() {
                continue;
            }
            for pair in versions.windows(2) {
                let v = pair[1];
                if v > MIN_SOURCE_OPSET && v <= MAX_TARGET_OPSET {
                    assert_ne!(
                        step_kind(op, v),
                        StepKind::Unknown,
                        "{op} at opset {v} is not classified"
                    );
                }
            }
        }
        assert_eq!(step_kind("Softmax", 13), StepKind::Convert);
        assert_eq!(step_kind("ReduceMean", 18), StepKind::Convert);
        assert_eq!(step_kind("ReduceMean", 13), StepKind::Compatible);
        assert_eq!(step_kind("Conv", 11), StepKind::Compatible);
        assert_eq!(step_kind("Conv", 12), StepKind::Unknown);
    }

    #[test]
    fn no_pair_is_both_converted_and_compatible() {
        for (v, ops) in COMPATIBLE {
            for op in ops.split_whitespace() {
                assert_eq!(step_kind(op, *v), StepKind::Compatible, "{op} at opset {v}");
            }
        }
    }
}
