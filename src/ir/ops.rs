//! Typed views of the ops that passes read the attributes of: Conv and ConvTranspose, Gemm,
//! MatMul. A view is read from a [`Node`] (`Conv::view(&node)?`) and never written back: the
//! node stays the one source of truth, and an op nobody has a view for passes through untouched.
//!
//! `view` fails, with a reason, when the node is not that op (other type, or not the default
//! domain) or is malformed in a way ONNX forbids and no runtime accepts: no weight input, a
//! `group` below 1, an `auto_pad` ONNX does not define. Attribute defaults are the ONNX ones.
//! Lists whose default depends on the kernel's spatial rank (strides, dilations, pads) are kept
//! as written (`None` when absent) and resolved by methods that take the rank and check it.
//!
//! Where these readings differ from hand-written attribute readers elsewhere, for whoever
//! moves those onto the views (they differ on malformed models only): a `group` of 0 or less
//! is an error here (the passes' `.max(1)` reads it as 1); an unknown `auto_pad` string is an
//! error (correct_bias reads it as NOTSET); `transA`/`transB` are "transposed when not 0", as in
//! ONNX Runtime (the opset inference's `.clamp(0, 1)` reads -1 as 0).
//!
//! The weight layouts (output-channel axis of the weight, the axis per-channel quantization,
//! equalisation and BatchNorm folding scale along):
//! - Conv: X `[N, C_in, d…]`, W `[C_out, C_in/group, k…]`: output channels on axis 0 of W.
//! - ConvTranspose: X `[N, C_in, d…]`, W `[C_in, C_out/group, k…]`: output channels on axis 1
//!   of W (channel `g·(C_out/group) + j` of group `g` is `W[g·(C_in/group) + i, j, …]`).
//! - Gemm: `Y = alpha·A'·B' + beta·C` with `A' = transA ? Aᵀ : A` and `B' = transB ? Bᵀ : B`; B
//!   is `[K, N]`, or `[N, K]` with transB: output columns on axis 1, or 0 with transB.
//! - MatMul with a constant B `[…, K, N]`: output columns on the last axis.

use crate::ir::Node;

/// Input slots shared by Conv, ConvTranspose and Gemm: data, weight, bias.
pub const DATA_SLOT: usize = 0;
/// The weight: W of Conv/ConvTranspose, B of Gemm and MatMul.
pub const WEIGHT_SLOT: usize = 1;
/// The optional bias: B of Conv/ConvTranspose, C of Gemm (absent when missing or "").
pub const BIAS_SLOT: usize = 2;

/// How a Conv or ConvTranspose pads its input (attribute `auto_pad`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    /// `NOTSET` (the default, also an empty string): the explicit `pads` apply.
    NotSet,
    /// `SAME_UPPER`: output size `ceil(input / stride)`, an odd padding's extra cell at the end.
    SameUpper,
    /// `SAME_LOWER`: output size `ceil(input / stride)`, an odd padding's extra cell at the start.
    SameLower,
    /// `VALID`: no padding.
    Valid,
}

/// A Conv or ConvTranspose node, attributes read with their ONNX defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv {
    /// True for ConvTranspose, false for Conv.
    pub transposed: bool,
    /// Input slot of the weight W (always [`WEIGHT_SLOT`], 1).
    pub weight_slot: usize,
    /// Input slot of the bias B (always [`BIAS_SLOT`], 2), if the node has one.
    pub bias_slot: Option<usize>,
    /// The axis of W holding the output channels: 0 for Conv (`[C_out, C_in/group, k…]`), 1 for
    /// ConvTranspose (`[C_in, C_out/group, k…]`).
    pub weight_output_axis: usize,
    /// Attribute `group` (default 1), at least 1: channels are split into this many groups, each
    /// convolved with its own slice of W. `group == C_in == C_out` is a depthwise convolution.
    pub group: usize,
    /// Attribute `kernel_shape` as written (the spatial dims of W), None when absent (then
    /// W's dims from axis 2 on are the kernel).
    pub kernel_shape: Option<Vec<i64>>,
    /// Attribute `strides` as written, one per spatial axis; None when absent (all 1). See
    /// [`Conv::strides`].
    pub strides: Option<Vec<i64>>,
    /// Attribute `pads` as written, `[begin_1, …, begin_n, end_1, …, end_n]`; None when absent
    /// (all 0). Only used when `auto_pad` is NOTSET. See [`Conv::pads`].
    pub pads: Option<Vec<i64>>,
    /// Attribute `dilations` as written, one per spatial axis; None when absent (all 1). See
    /// [`Conv::dilations`].
    pub dilations: Option<Vec<i64>>,
    /// Attribute `auto_pad` (default NOTSET).
    pub auto_pad: AutoPad,
    /// ConvTranspose's attribute `output_padding` as written (None when absent, and on Conv):
    /// extra cells added at the end of each spatial output axis.
    pub output_padding: Option<Vec<i64>>,
    /// ConvTranspose's attribute `output_shape` as written (None when absent, and on Conv): the
    /// requested spatial output size, from which the pads are then computed.
    pub output_shape: Option<Vec<i64>>,
}

/// A Gemm node: `Y = alpha · A' · B' + beta · C`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    /// Attribute `transA` (default 0) not 0: A is `[K, M]` and is transposed.
    pub trans_a: bool,
    /// Attribute `transB` (default 0) not 0: B is `[N, K]` and is transposed.
    pub trans_b: bool,
    /// Attribute `alpha` (default 1): the factor of `A' · B'`.
    pub alpha: f32,
    /// Attribute `beta` (default 1): the factor of C (a `beta` of 0 ignores C).
    pub beta: f32,
    /// Input slot of B, the weight when it is a constant (always [`WEIGHT_SLOT`], 1).
    pub weight_slot: usize,
    /// Input slot of C (always [`BIAS_SLOT`], 2), if the node has one.
    pub bias_slot: Option<usize>,
    /// The axis of B holding the N output columns: 1 (`B [K, N]`), or 0 with transB (`[N, K]`).
    pub weight_output_axis: usize,
    /// The axis of B holding the K input features (the other one).
    pub weight_input_axis: usize,
}

/// A MatMul node, `Y = A · B` with numpy-style batching.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMul {
    /// Input slot of B, the weight when it is a constant (always [`WEIGHT_SLOT`], 1).
    pub weight_slot: usize,
}

fn expect_op(node: &Node, ops: &[&str]) -> Result<(), String> {
    if !node.is_default_domain() || !ops.contains(&node.op_type.as_str()) {
        let domain = if node.is_default_domain() {
            String::new()
        } else {
            format!(" of domain '{}'", node.domain)
        };
        return Err(format!("{}{domain} is not a {}", node.label(), ops.join(" or ")));
    }
    Ok(())
}

fn has_input(node: &Node, slot: usize) -> bool {
    node.inputs.get(slot).is_some_and(|s| !s.is_empty())
}

fn weight_input(node: &Node) -> Result<(), String> {
    if has_input(node, WEIGHT_SLOT) {
        Ok(())
    } else {
        Err(format!("{} has no weight input", node.label()))
    }
}

fn bias_input(node: &Node) -> Option<usize> {
    has_input(node, BIAS_SLOT).then_some(BIAS_SLOT)
}

/// A per-spatial-axis list of `rank` values, `default` when absent; Err when it has another
/// length or a value below `min`.
fn per_axis(
    label: &str,
    name: &str,
    list: Option<&[i64]>,
    len: usize,
    default: usize,
    min: i64,
) -> Result<Vec<usize>, String> {
    match list {
        None => Ok(vec![default; len]),
        Some(v) if v.len() == len && v.iter().all(|&x| x >= min) => Ok(v.iter().map(|&x| x as usize).collect()),
        Some(v) if v.len() != len => Err(format!("{label}: {name} {v:?} does not have {len} values")),
        Some(v) => Err(format!("{label}: {name} {v:?} has a value below {min}")),
    }
}

impl Conv {
    /// Reads a Conv or ConvTranspose node (see the module documentation for what is refused).
    pub fn view(node: &Node) -> Result<Conv, String> {
        expect_op(node, &["Conv", "ConvTranspose"])?;
        weight_input(node)?;
        let transposed = node.op_type == "ConvTranspose";
        let group = node.attr_int("group").unwrap_or(1);
        if group < 1 {
            return Err(format!("{}: group {group} is not a positive number", node.label()));
        }
        let auto_pad = match node.attr_string("auto_pad").as_deref() {
            None | Some("") | Some("NOTSET") => AutoPad::NotSet,
            Some("SAME_UPPER") => AutoPad::SameUpper,
            Some("SAME_LOWER") => AutoPad::SameLower,
            Some("VALID") => AutoPad::Valid,
            Some(other) => return Err(format!("{}: unknown auto_pad '{other}'", node.label())),
        };
        let list = |name: &str| node.attr_ints(name).map(<[i64]>::to_vec);
        let transposed_list = |name: &str| if transposed { list(name) } else { None };
        Ok(Conv {
            transposed,
            weight_slot: WEIGHT_SLOT,
            bias_slot: bias_input(node),
            weight_output_axis: if transposed { 1 } else { 0 },
            group: group as usize,
            kernel_shape: list("kernel_shape"),
            strides: list("strides"),
            pads: list("pads"),
            dilations: list("dilations"),
            auto_pad,
            output_padding: transposed_list("output_padding"),
            output_shape: transposed_list("output_shape"),
        })
    }

    /// The strides for a kernel of `rank` spatial axes: all 1 when absent; Err when the list
    /// has another length or a value below 1.
    pub fn strides(&self, rank: usize) -> Result<Vec<usize>, String> {
        per_axis(self.op(), "strides", self.strides.as_deref(), rank, 1, 1)
    }

    /// The dilations for a kernel of `rank` spatial axes: all 1 when absent; Err when the list
    /// has another length or a value below 1.
    pub fn dilations(&self, rank: usize) -> Result<Vec<usize>, String> {
        per_axis(self.op(), "dilations", self.dilations.as_deref(), rank, 1, 1)
    }

    /// The explicit pads for a kernel of `rank` spatial axes as (begin, end) per axis: all 0
    /// when absent; Err when the list does not have `2 · rank` values or one is negative. They
    /// apply only when `auto_pad` is [`AutoPad::NotSet`].
    pub fn pads(&self, rank: usize) -> Result<(Vec<usize>, Vec<usize>), String> {
        let all = per_axis(self.op(), "pads", self.pads.as_deref(), 2 * rank, 0, 0)?;
        Ok((all[..rank].to_vec(), all[rank..].to_vec()))
    }

    /// Whether the input is read zero-padded anywhere: a non-zero explicit pad (with NOTSET), or
    /// SAME_UPPER / SAME_LOWER (which pad unless the sizes happen to fit).
    pub fn is_padded(&self) -> bool {
        match self.auto_pad {
            AutoPad::NotSet => self.pads.as_ref().is_some_and(|p| p.iter().any(|&p| p != 0)),
            AutoPad::SameUpper | AutoPad::SameLower => true,
            AutoPad::Valid => false,
        }
    }

    fn op(&self) -> &'static str {
        if self.transposed {
            "ConvTranspose"
        } else {
            "Conv"
        }
    }
}

impl Gemm {
    /// Reads a Gemm node (refused: another op, or no B input).
    pub fn view(node: &Node) -> Result<Gemm, String> {
        expect_op(node, &["Gemm"])?;
        weight_input(node)?;
        let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
        Ok(Gemm {
            trans_a: node.attr_int("transA").unwrap_or(0) != 0,
            trans_b,
            alpha: node.attr_float("alpha").unwrap_or(1.0),
            beta: node.attr_float("beta").unwrap_or(1.0),
            weight_slot: WEIGHT_SLOT,
            bias_slot: bias_input(node),
            weight_output_axis: if trans_b { 0 } else { 1 },
            weight_input_axis: if trans_b { 1 } else { 0 },
        })
    }
}

impl MatMul {
    /// Reads a MatMul node (refused: another op, or no B input).
    pub fn view(node: &Node) -> Result<MatMul, String> {
        expect_op(node, &["MatMul"])?;
        weight_input(node)?;
        Ok(MatMul {
            weight_slot: WEIGHT_SLOT,
        })
    }

    /// The axis of a constant B of rank `weight_rank` that holds the output columns: the last
    /// one (`B [..., K, N]`); None for a rank-0 B, which MatMul does not accept.
    pub fn weight_output_axis(&self, weight_rank: usize) -> Option<usize> {
        weight_rank.checked_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AttributeProto;

    fn node(op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> Node {
        let mut n = Node::new("n", op, inputs.iter().map(|s| s.to_string()).collect(), "y", 0);
        n.attributes = attributes;
        n
    }

    use crate::ir::attribute::{float, int, ints, string};

    #[test]
    fn conv_defaults() {
        let c = Conv::view(&node("Conv", &["x", "w"], vec![])).unwrap();
        assert_eq!(
            c,
            Conv {
                transposed: false,
                weight_slot: 1,
                bias_slot: None,
                weight_output_axis: 0,
                group: 1,
                kernel_shape: None,
                strides: None,
                pads: None,
                dilations: None,
                auto_pad: AutoPad::NotSet,
                output_padding: None,
                output_shape: None,
            }
        );
        assert_eq!(c.strides(2).unwrap(), [1, 1]);
        assert_eq!(c.dilations(2).unwrap(), [1, 1]);
        assert_eq!(c.pads(2).unwrap(), (vec![0, 0], vec![0, 0]));
        assert!(!c.is_padded());
    }

    #[test]
    fn conv_attributes() {
        let c = Conv::view(&node(
            "Conv",
            &["x", "w", "b"],
            vec![
                int("group", 4),
                ints("kernel_shape", &[3, 3]),
                ints("strides", &[2, 1]),
                ints("pads", &[1, 0, 1, 2]),
                ints("dilations", &[1, 2]),
                string("auto_pad", "NOTSET"),
                // Not a Conv attribute: ignored.
                ints("output_padding", &[1, 1]),
            ],
        ))
        .unwrap();
        assert_eq!((c.group, c.bias_slot, c.weight_output_axis), (4, Some(2), 0));
        assert_eq!(c.kernel_shape.as_deref(), Some(&[3, 3][..]));
        assert_eq!(c.strides(2).unwrap(), [2, 1]);
        assert_eq!(c.dilations(2).unwrap(), [1, 2]);
        assert_eq!(c.pads(2).unwrap(), (vec![1, 0], vec![1, 2]));
        assert!(c.is_padded());
        assert_eq!(c.output_padding, None);
        // Lists that do not fit the kernel's rank, or values out of range.
        assert!(c
            .strides(3)
            .unwrap_err()
            .contains("strides [2, 1] does not have 3 values"));
        assert!(c.pads(1).is_err());
        let bad = Conv::view(&node("Conv", &["x", "w"], vec![ints("strides", &[0, 1])])).unwrap();
        assert!(bad.strides(2).unwrap_err().contains("below 1"));
        let bad = Conv::view(&node("Conv", &["x", "w"], vec![ints("pads", &[0, -1])])).unwrap();
        assert!(bad.pads(1).unwrap_err().contains("below 0"));
    }

    #[test]
    fn conv_transpose_has_its_output_channels_on_axis_1() {
        let c = Conv::view(&node(
            "ConvTranspose",
            &["x", "w", ""],
            vec![
                int("group", 2),
                ints("output_padding", &[1]),
                ints("output_shape", &[9]),
                string("auto_pad", "SAME_LOWER"),
                ints("pads", &[0, 0]),
            ],
        ))
        .unwrap();
        assert!(c.transposed);
        assert_eq!((c.weight_output_axis, c.group, c.bias_slot), (1, 2, None));
        assert_eq!(c.output_padding.as_deref(), Some(&[1][..]));
        assert_eq!(c.output_shape.as_deref(), Some(&[9][..]));
        assert_eq!(c.auto_pad, AutoPad::SameLower);
        assert!(c.is_padded());
        let valid = Conv::view(&node(
            "Conv",
            &["x", "w"],
            vec![string("auto_pad", "VALID"), ints("pads", &[1, 1])],
        ));
        assert!(!valid.unwrap().is_padded());
    }

    #[test]
    fn conv_refusals_say_why() {
        let e = Conv::view(&node("Gemm", &["x", "w"], vec![])).unwrap_err();
        assert_eq!(e, "Gemm 'n' is not a Conv or ConvTranspose");
        let mut custom = node("Conv", &["x", "w"], vec![]);
        custom.domain = "com.example".into();
        assert!(Conv::view(&custom).unwrap_err().contains("of domain 'com.example'"));
        assert!(Conv::view(&node("Conv", &["x", ""], vec![]))
            .unwrap_err()
            .contains("no weight input"));
        assert!(Conv::view(&node("Conv", &["x", "w"], vec![int("group", 0)]))
            .unwrap_err()
            .contains("group 0"));
        assert!(Conv::view(&node("Conv", &["x", "w"], vec![string("auto_pad", "SAME")]))
            .unwrap_err()
            .contains("unknown auto_pad 'SAME'"));
        // "ai.onnx" is the default domain too.
        let mut named = node("Conv", &["x", "w"], vec![]);
        named.domain = "ai.onnx".into();
        assert!(Conv::view(&named).is_ok());
    }

    #[test]
    fn gemm_attributes_and_weight_axes() {
        let g = Gemm::view(&node("Gemm", &["a", "b"], vec![])).unwrap();
        assert_eq!(
            g,
            Gemm {
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: 1.0,
                weight_slot: 1,
                bias_slot: None,
                weight_output_axis: 1,
                weight_input_axis: 0,
            }
        );
        let g = Gemm::view(&node(
            "Gemm",
            &["a", "b", "c"],
            vec![
                int("transA", 1),
                int("transB", 1),
                float("alpha", 0.5),
                float("beta", 0.0),
            ],
        ))
        .unwrap();
        assert!(g.trans_a && g.trans_b);
        assert_eq!((g.alpha, g.beta, g.bias_slot), (0.5, 0.0, Some(2)));
        assert_eq!((g.weight_output_axis, g.weight_input_axis), (0, 1));
        assert!(Gemm::view(&node("Gemm", &["a"], vec![])).is_err());
        assert!(Gemm::view(&node("MatMul", &["a", "b"], vec![])).is_err());
    }

    #[test]
    fn matmul_weight_output_axis_is_the_last() {
        let m = MatMul::view(&node("MatMul", &["a", "b"], vec![])).unwrap();
        assert_eq!(m.weight_slot, 1);
        assert_eq!(m.weight_output_axis(2), Some(1));
        assert_eq!(m.weight_output_axis(3), Some(2));
        assert_eq!(m.weight_output_axis(0), None);
        assert!(MatMul::view(&node("Conv", &["a", "b"], vec![])).is_err());
    }
}
