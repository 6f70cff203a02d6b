//! The op registry: for every op onnxq quantizes, one [`Rule`] saying how — its role, which
//! inputs are data, its weight and output-channel axis, its bias, and hooks for the decisions
//! that depend on the node (Resize's mode, an Add with a constant operand). The planner walks the
//! graph and asks [`rule_for`] about each node; an op without a rule stays float. One file per op
//! family fills the table, each rule with a line saying why (ONNX Runtime's `QDQRegistry` as
//! data); [`target`] holds what each backend expects. A new op is one entry in its family.

mod joins;
mod pass_through;
mod pools;
mod target;
mod weighted;

pub use target::{Target, TargetRules};
pub use weighted::FUSED_ACTIVATIONS;

use crate::ir::Node;

/// How an op takes part in quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpRole {
    /// Computes with a weight: its data inputs get Q/DQ, its weight is quantized
    /// (per-channel on its rule's weight axis), its bias goes int32 or stays float per target.
    Weighted,
    /// Joins activations (residual Add, Concat): inputs get Q/DQ; Concat inputs share one scale.
    Join,
    /// Reorders or selects values without arithmetic (MaxPool, Reshape, Transpose, ...): its
    /// output must share the input's parameters so backends run it in int8.
    PassThrough,
    /// Averages (AveragePool, GlobalAveragePool, interpolating Resize): inputs get Q/DQ.
    Pool,
}

/// How one op type is quantized: data, plus hooks for what depends on the node.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub op_type: &'static str,
    pub role: OpRole,
    /// The input slots that carry activations (not shapes, axes, scales); the planner skips the
    /// constants among them.
    pub data: DataInputs,
    /// Weighted ops: the weight input and its output-channel axis.
    pub weight: Option<WeightRule>,
    /// The bias input that may go int32, where the target wants int32 biases.
    pub bias: Option<BiasRule>,
    /// The inputs and the output share one set of parameters (Concat).
    pub shared_scale: bool,
    /// Hook: why this node stays float under a target, beyond what its role says.
    pub stays_float: Option<StaysFloat>,
    /// Hook: the rule this node follows instead, given its attributes (Resize by mode).
    pub refine: Option<fn(&Node) -> Option<&'static Rule>>,
}

/// `(node, target, is_constant)` → the reason the node stays float, if it does; `is_constant`
/// says whether a tensor is computed from constants only.
pub type StaysFloat = fn(&Node, &TargetRules, &dyn Fn(&str) -> bool) -> Option<&'static str>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataInputs {
    /// These slots (those the node has).
    Slots(&'static [usize]),
    /// Every input.
    All,
}

#[derive(Clone, Copy, Debug)]
pub struct WeightRule {
    /// The input holding the weight (when it is a float constant).
    pub slot: usize,
    /// `(node, weight rank)` → the output-channel axis for per-channel parameters.
    pub axis: fn(&Node, usize) -> Option<usize>,
}

#[derive(Clone, Copy, Debug)]
pub struct BiasRule {
    /// The input holding the bias (when it is a 1-D float constant).
    pub slot: usize,
    /// Whether this node's bias can go int32 at all.
    pub when: fn(&Node) -> bool,
}

impl Rule {
    /// A rule with only a role: input 0 is data, no weight, no bias, no hooks.
    const fn new(op_type: &'static str, role: OpRole) -> Rule {
        Rule {
            op_type,
            role,
            data: DataInputs::Slots(&[0]),
            weight: None,
            bias: None,
            shared_scale: false,
            stays_float: None,
            refine: None,
        }
    }

    /// The data input slots of a node of this op with `input_count` inputs.
    pub fn data_inputs(&self, input_count: usize) -> Vec<usize> {
        match self.data {
            DataInputs::Slots(slots) => slots.to_vec(),
            DataInputs::All => (0..input_count).collect(),
        }
    }

    /// Why this node stays float under `target` although its op has a rule, if it does.
    pub fn why_float(
        &self,
        n: &Node,
        target: &TargetRules,
        is_constant: &dyn Fn(&str) -> bool,
    ) -> Option<&'static str> {
        if target.only_weighted_inputs && self.role != OpRole::Weighted {
            return Some("the target puts Q/DQ on the inputs of weighted ops only");
        }
        if self.role == OpRole::Join && !target.quantize_joins {
            return Some("the target keeps joins float");
        }
        self.stays_float.and_then(|hook| hook(n, target, is_constant))
    }

    /// The bias rule, where the target wants int32 biases.
    pub fn int32_bias(&self, target: &TargetRules) -> Option<BiasRule> {
        self.bias.filter(|_| target.int32_bias)
    }

    /// The pairs of this node's tensors that must share parameters: a pass-through op's input 0
    /// and output 0; a shared-scale op's input 0 with every other input and output 0.
    pub fn ties(&self, n: &Node) -> Vec<(String, String)> {
        let (Some(first), output) = (n.inputs.first(), n.outputs.first()) else {
            return vec![];
        };
        let others: Vec<&String> = match self.role {
            OpRole::PassThrough => output.into_iter().collect(),
            _ if self.shared_scale => n.inputs[1..].iter().chain(output).collect(),
            _ => vec![],
        };
        others.into_iter().map(|o| (first.clone(), o.clone())).collect()
    }
}

/// Every family's rules: the registry.
const FAMILIES: [&[Rule]; 4] = [weighted::RULES, joins::RULES, pools::RULES, pass_through::RULES];

/// The rule for an op type of the default domain, if onnxq quantizes it.
pub fn rule(op_type: &str) -> Option<&'static Rule> {
    FAMILIES.into_iter().flatten().find(|r| r.op_type == op_type)
}

/// The rule a node follows: none outside the default domain or for an op onnxq does not
/// quantize (it stays float); else its op's rule, refined by the node's attributes.
pub fn rule_for(n: &Node) -> Option<&'static Rule> {
    if !n.is_default_domain() {
        return None;
    }
    let rule = rule(&n.op_type)?;
    Some(rule.refine.and_then(|refine| refine(n)).unwrap_or(rule))
}

/// The tensors some node reads at a data input of its op's rule: the only ones a plan can
/// quantize, so the only ones calibration needs to observe.
pub fn data_inputs_of_rules(g: &crate::ir::Graph) -> std::collections::BTreeSet<String> {
    g.nodes
        .node_weights()
        .filter_map(|n| rule_for(n).map(|r| (n, r)))
        .flat_map(|(n, r)| {
            r.data_inputs(n.inputs.len())
                .into_iter()
                .filter_map(move |slot| n.inputs.get(slot))
        })
        .filter(|t| !t.is_empty())
        .cloned()
        .collect()
}

/// The weighted op types, in registry order (the ops a layer can run in float16).
pub fn weighted_op_types() -> impl Iterator<Item = &'static str> {
    FAMILIES
        .into_iter()
        .flatten()
        .filter(|r| r.role == OpRole::Weighted)
        .map(|r| r.op_type)
}

/// Ranges this wide are sentinels (float32-min attention masks, "minus infinity" padding), not
/// signal: quantizing them would make the scale useless for the real values.
pub const SENTINEL_MAGNITUDE: f32 = 1e30;

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str]) -> Node {
        Node::new("n", op, inputs.iter().map(|i| i.to_string()).collect(), "y", 0)
    }

    fn with_int(mut n: Node, name: &str, v: i64) -> Node {
        n.attributes.push(crate::ir::attribute::int(name, v));
        n
    }

    fn with_string(mut n: Node, name: &str, v: &str) -> Node {
        n.attributes.push(crate::ir::attribute::string(name, v));
        n
    }

    const TARGETS: [Target; 4] = [Target::Generic, Target::Tensorrt, Target::Openvino, Target::Onnxruntime];

    #[test]
    fn every_op_type_has_one_rule_and_only_weighted_ops_have_weights() {
        let all: Vec<&Rule> = FAMILIES.into_iter().flatten().collect();
        for r in &all {
            assert_eq!(
                all.iter().filter(|o| o.op_type == r.op_type).count(),
                1,
                "{}",
                r.op_type
            );
            assert_eq!(r.weight.is_some(), r.role == OpRole::Weighted, "{}", r.op_type);
            assert!(
                r.bias.is_none() || r.weight.is_some(),
                "{}: a bias without a weight",
                r.op_type
            );
        }
        let of_role = |role| {
            let mut ops: Vec<&str> = all.iter().filter(|r| r.role == role).map(|r| r.op_type).collect();
            ops.sort_unstable();
            ops
        };
        assert_eq!(of_role(OpRole::Weighted), ["Conv", "ConvTranspose", "Gemm", "MatMul"]);
        assert_eq!(of_role(OpRole::Join), ["Add", "Concat"]);
        assert_eq!(of_role(OpRole::Pool), ["AveragePool", "GlobalAveragePool"]);
        let pass_through = [
            "DepthToSpace",
            "Flatten",
            "GlobalMaxPool",
            "Identity",
            "MaxPool",
            "Reshape",
            "Resize",
            "Slice",
            "SpaceToDepth",
            "Split",
            "Squeeze",
            "Transpose",
            "Unsqueeze",
        ];
        assert_eq!(of_role(OpRole::PassThrough), pass_through);
        assert_eq!(
            weighted_op_types().collect::<Vec<_>>(),
            ["Conv", "ConvTranspose", "Gemm", "MatMul"]
        );
    }

    #[test]
    fn an_unknown_op_or_another_domain_has_no_rule_and_stays_float() {
        for op in ["Softmax", "Relu", "Mul", "LayerNormalization", "Gelu", "conv", ""] {
            assert!(rule_for(&node(op, &["x"])).is_none(), "{op}");
        }
        let mut ms = node("Conv", &["x", "w"]);
        ms.domain = "com.microsoft".into();
        assert!(rule_for(&ms).is_none());
        ms.domain = "ai.onnx".into();
        assert_eq!(rule_for(&ms).map(|r| r.role), Some(OpRole::Weighted));
    }

    #[test]
    fn a_weighted_node_with_malformed_attributes_stays_float_with_the_reason() {
        let target = Target::Generic.rules();
        let never = |_: &str| false;
        let conv = node("Conv", &["x", "w"]);
        let rule = rule_for(&conv).unwrap();
        assert_eq!(rule.why_float(&conv, &target, &never), None);
        let bad = with_int(conv, "group", 0);
        let why = rule.why_float(&bad, &target, &never).unwrap();
        assert!(why.contains("break ONNX's rules"), "{why}");
    }

    #[test]
    fn resize_is_pass_through_only_in_nearest_mode() {
        let resize = node("Resize", &["x", "roi", "scales", "sizes"]);
        let nearest = with_string(resize.clone(), "mode", "nearest");
        for n in [&resize, &nearest] {
            let r = rule_for(n).unwrap();
            assert_eq!(r.role, OpRole::PassThrough);
            assert_eq!(r.ties(n), [("x".to_string(), "y".to_string())]);
        }
        for mode in ["linear", "cubic"] {
            let n = with_string(resize.clone(), "mode", mode);
            let r = rule_for(&n).unwrap();
            assert_eq!(r.role, OpRole::Pool, "{mode}");
            assert!(
                r.ties(&n).is_empty(),
                "{mode}: an interpolated output keeps its own scale"
            );
            assert_eq!(r.data_inputs(4), [0], "{mode}: roi, scales and sizes are not data");
        }
        // The registry's own entry is the nearest one; the node's mode picks the other.
        assert_eq!(rule("Resize").unwrap().role, OpRole::PassThrough);
    }

    #[test]
    fn int32_bias_per_target() {
        for target in TARGETS {
            let rules = target.rules();
            for op in ["Conv", "ConvTranspose", "Gemm"] {
                let bias = rule(op).unwrap().int32_bias(&rules);
                assert_eq!(
                    bias.map(|b| b.slot),
                    (target != Target::Tensorrt).then_some(2),
                    "{op} {target:?}"
                );
            }
            for op in ["MatMul", "Add", "Concat", "AveragePool", "MaxPool", "Reshape"] {
                assert!(rule(op).unwrap().int32_bias(&rules).is_none(), "{op} {target:?}");
            }
        }
        let bias = rule("Gemm").unwrap().bias.unwrap();
        assert!((bias.when)(&node("Gemm", &["a", "b", "c"])));
        assert!((bias.when)(&with_int(node("Gemm", &["a", "b", "c"]), "transA", 0)));
        assert!(!(bias.when)(&with_int(node("Gemm", &["a", "b", "c"]), "transA", 1)));
    }

    #[test]
    fn weight_axes_are_the_output_channels() {
        let axis = |n: &Node, rank| (rule_for(n).unwrap().weight.unwrap().axis)(n, rank);
        assert_eq!(axis(&node("Conv", &["x", "w"]), 4), Some(0));
        assert_eq!(axis(&node("ConvTranspose", &["x", "w"]), 4), Some(1));
        let gemm = node("Gemm", &["a", "b"]);
        assert_eq!(axis(&gemm, 2), Some(1));
        assert_eq!(axis(&with_int(gemm.clone(), "transB", 0), 2), Some(1));
        assert_eq!(axis(&with_int(gemm, "transB", 1), 2), Some(0));
        assert_eq!(axis(&node("MatMul", &["a", "b"]), 3), Some(2));
        assert_eq!(axis(&node("MatMul", &["a", "b"]), 0), None);
        for op in weighted_op_types() {
            assert_eq!(rule(op).unwrap().weight.unwrap().slot, 1, "{op}");
        }
    }

    #[test]
    fn data_inputs_are_activations_only() {
        let data = |op: &str, count| rule(op).unwrap().data_inputs(count);
        assert_eq!(data("Conv", 3), [0]);
        assert_eq!(data("Gemm", 3), [0, 1], "C is the bias");
        assert_eq!(data("MatMul", 2), [0, 1]);
        assert_eq!(data("Add", 2), [0, 1]);
        assert_eq!(data("Concat", 4), [0, 1, 2, 3]);
        assert_eq!(data("Reshape", 2), [0], "the shape is not data");
        assert_eq!(data("Slice", 5), [0]);
        assert_eq!(data("AveragePool", 1), [0]);
    }

    #[test]
    fn which_nodes_stay_float_per_target() {
        let never = |_: &str| false;
        let only_c = |t: &str| t == "c";
        let why = |op: &str, inputs: &[&str], target: Target, is_constant: &dyn Fn(&str) -> bool| {
            let n = node(op, inputs);
            rule_for(&n).unwrap().why_float(&n, &target.rules(), is_constant)
        };
        // Residual Adds: float for generic and TensorRT, quantized for OpenVINO and ONNX Runtime.
        assert!(why("Add", &["a", "b"], Target::Generic, &never).is_some_and(|r| r.contains("residual")));
        assert_eq!(why("Add", &["a", "b"], Target::Openvino, &never), None);
        assert_eq!(why("Add", &["a", "b"], Target::Onnxruntime, &never), None);
        // A bias add stays float wherever residual Adds are quantized.
        for target in [Target::Openvino, Target::Onnxruntime] {
            assert!(why("Add", &["a", "c"], target, &only_c).is_some_and(|r| r.contains("bias Add")));
            assert!(why("Add", &["c", "a"], target, &only_c).is_some_and(|r| r.contains("bias Add")));
        }
        // TensorRT: Q/DQ on weighted-op inputs only.
        for op in ["Add", "Concat", "AveragePool", "MaxPool", "Reshape"] {
            assert!(
                why(op, &["a", "b"], Target::Tensorrt, &never).is_some_and(|r| r.contains("weighted ops only")),
                "{op}"
            );
        }
        for target in TARGETS {
            for op in weighted_op_types() {
                assert_eq!(why(op, &["a", "c"], target, &only_c), None, "{op} {target:?}");
            }
        }
        assert_eq!(why("Concat", &["a", "b"], Target::Generic, &never), None);
        let mut no_joins = Target::Onnxruntime.rules();
        no_joins.quantize_joins = false;
        let concat = node("Concat", &["a", "b"]);
        assert!(rule_for(&concat)
            .unwrap()
            .why_float(&concat, &no_joins, &never)
            .is_some());
        assert!(Target::Tensorrt.fuses_weighted_outputs());
        assert!(!Target::Generic.fuses_weighted_outputs());
    }

    #[test]
    fn ties_share_parameters_of_concat_and_pass_through_only() {
        let pairs = |n: &Node| -> Vec<(String, String)> { rule_for(n).unwrap().ties(n) };
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            pairs(&node("Concat", &["a", "b", "c"])),
            [p("a", "b"), p("a", "c"), p("a", "y")]
        );
        assert_eq!(pairs(&node("Transpose", &["a"])), [p("a", "y")]);
        assert_eq!(pairs(&node("Reshape", &["a", "shape"])), [p("a", "y")]);
        let mut split = node("Split", &["a", "split"]);
        split.outputs = vec!["y0".into(), "y1".into()];
        assert_eq!(pairs(&split), [p("a", "y0")]);
        for op in ["Add", "Conv", "MatMul", "AveragePool", "GlobalAveragePool"] {
            assert!(pairs(&node(op, &["a", "b"])).is_empty(), "{op}");
        }
        assert!(
            pairs(&node("Concat", &[])).is_empty(),
            "no inputs: nothing to tie, no panic"
        );
    }
}
