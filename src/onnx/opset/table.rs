//! The reviewed table of redefinitions: for every (operator, opset version) at which an ONNX
//! operator was redefined, up to [`super::MAX_TARGET_OPSET`], whether a model crossing it needs
//! nothing (compatible: types added, constraints relaxed, attributes added with the old
//! behaviour as default) or a conversion, and which kind (see [`super::convert`]). Reviewed
//! against the ONNX changelog and the onnx 1.23 schemas. A pair that is in neither list is
//! refused, so that a schema table regenerated with newer operators cannot slip through.

use super::listed;

/// What crossing one redefinition needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepKind {
    /// Types added, constraints relaxed, attributes added with the old behaviour as default.
    Compatible,
    /// Needs a conversion (or a check that may refuse) of this kind.
    Convert(Conversion),
    /// Not reviewed: refused.
    Unknown,
}

/// The kinds of conversion, one function each in [`super::convert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Conversion {
    /// Attributes that became inputs: moved into constants wired to the new input slots.
    AttributesToInputs,
    /// Optional outputs that changed or went: dropped when nothing reads them, else refused.
    DropOutputs,
    /// A deprecated operator: renamed to its successor, which has the same signature.
    Rename,
    /// Attributes removed, renamed, or whose default changed: dropped, renamed or made explicit.
    RestateAttributes,
    /// Types or forms that were removed and have no equivalent: refused when used.
    Check,
    /// A semantic change: the node is rewritten (Resize, Softmax family, GroupNormalization).
    Rewrite,
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
    use Conversion::*;
    let conversion = match (op, v) {
        ("Upsample", 9)
        | ("Slice" | "TopK", 10)
        | ("Clip" | "Pad", 11)
        | ("Dropout", 12)
        | ("ReduceSum" | "Squeeze" | "Unsqueeze" | "Split", 13)
        | ("DFT", 20) => AttributesToInputs,
        (_, 18) if listed(REDUCE_AXES_18, op) => AttributesToInputs,
        ("Dropout", 10) | ("BatchNormalization", 14) => DropOutputs,
        ("Upsample", 10) | ("Scatter", 11) => Rename,
        ("BatchNormalization", 9) | ("RoiAlign", 16) | ("Split", 18) | ("GridSample", 20) => RestateAttributes,
        ("Scan", 9) | ("Erf", 13) => Check,
        ("Resize", 11 | 13) | ("Softmax" | "LogSoftmax" | "Hardmax", 13) | ("GroupNormalization", 21) => Rewrite,
        _ if COMPATIBLE.iter().any(|(version, ops)| *version == v && listed(ops, op)) => return StepKind::Compatible,
        _ => return StepKind::Unknown,
    };
    StepKind::Convert(conversion)
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
        assert_eq!(step_kind("Softmax", 13), StepKind::Convert(Conversion::Rewrite));
        assert_eq!(
            step_kind("ReduceMean", 18),
            StepKind::Convert(Conversion::AttributesToInputs)
        );
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
