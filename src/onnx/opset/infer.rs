//! What is known of each tensor, for the conversions that depend on it (the element type of a
//! Clip bound or a Pad value, the rank under a Softmax, the channel count of a
//! GroupNormalization): element type, shape (rank with possibly unknown dims), and the values
//! of small integer tensors (shapes being computed). Declared value infos first, then a forward
//! pass over the common operators in topological order; what is declared wins over what is
//! inferred, and anything unknown stays None. Non-default-domain nodes are not looked into.

use std::collections::HashMap;

use super::listed;
use crate::error::Result;
use crate::ir::{tensor, Graph, Node};
use crate::proto::tensor_proto::DataType;
use crate::proto::{TensorProto, ValueInfoProto};

/// Dimensions (or small integer values), each None when unknown.
pub(super) type Dims = Vec<Option<i64>>;

/// What is known of one tensor.
#[derive(Clone, Debug, Default)]
pub(super) struct Fact {
    /// The element type (an ONNX `DataType`).
    pub(super) dtype: Option<i32>,
    /// The shape: the rank is known when this is Some, each dim may still be unknown.
    pub(super) shape: Option<Dims>,
    /// Values of a scalar or 1-D integer tensor.
    pub(super) value: Option<Dims>,
}

/// Facts by tensor name.
pub(super) type Facts = HashMap<String, Fact>;

fn declared_fact(v: &ValueInfoProto) -> Option<Fact> {
    use crate::proto::tensor_shape_proto::dimension::Value as Dim;
    use crate::proto::type_proto::Value;
    let Some(Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return None;
    };
    let dtype = t.elem_type.filter(|&d| d != DataType::Undefined as i32);
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) if v >= 0 => Some(v),
                _ => None,
            })
            .collect()
    });
    Some(Fact {
        dtype,
        shape,
        value: None,
    })
}

/// A constant's fact: its type and dims, and its values when it is a small integer vector.
pub(super) fn constant_fact(t: &TensorProto) -> Fact {
    let value = if t.dims.len() <= 1 && tensor::element_count(t) <= 64 {
        tensor::values_i128(t).map(|v| v.into_iter().map(|x| i64::try_from(x).ok()).collect())
    } else {
        None
    };
    Fact {
        dtype: Some(t.data_type()),
        shape: Some(t.dims.iter().map(|&d| Some(d)).collect()),
        value,
    }
}

/// Merges what inference found into what is declared: declared element type and shape win,
/// inferred values are kept.
fn merge(known: &mut Fact, inferred: Fact) {
    if known.dtype.is_none() {
        known.dtype = inferred.dtype;
    }
    match (&mut known.shape, inferred.shape) {
        (None, s) => known.shape = s,
        (Some(k), Some(s)) if k.len() == s.len() => {
            for (a, b) in k.iter_mut().zip(s) {
                if a.is_none() {
                    *a = b;
                }
            }
        }
        _ => {}
    }
    if known.value.is_none() {
        known.value = inferred.value;
    }
}

/// The facts of every tensor of `graph`, starting from those of the enclosing graphs (`outer`,
/// empty for the main graph).
pub(super) fn infer_facts(graph: &Graph, outer: &Facts) -> Result<Facts> {
    let mut facts = outer.clone();
    for v in graph.inputs.iter().chain(&graph.value_info).chain(&graph.outputs) {
        if let Some(f) = declared_fact(v) {
            facts.insert(v.name().to_string(), f);
        }
    }
    for (name, c) in &graph.constants {
        facts.insert(name.clone(), constant_fact(&c.tensor));
    }
    for ix in graph.topological_order()? {
        let n = &graph.nodes[ix];
        if !n.is_default_domain() {
            continue;
        }
        let inferred = infer_node(n, &facts);
        for (out, f) in n.outputs.iter().zip(inferred) {
            if out.is_empty() {
                continue;
            }
            merge(facts.entry(out.clone()).or_default(), f);
        }
    }
    Ok(facts)
}

/// Ops whose output 0 has the type and shape of input 0.
const SAME_AS_INPUT: &str = "Abs Acos Acosh Asin Asinh Atan Atanh BatchNormalization Ceil Celu Clip Cos Cosh CumSum \
    Dropout Elu Erf Exp Floor Gelu GroupNormalization HardSigmoid HardSwish Hardmax Identity \
    InstanceNormalization LRN LayerNormalization LeakyRelu Log LogSoftmax LpNormalization \
    MeanVarianceNormalization Mish Neg Reciprocal Relu ReverseSequence Round Scatter \
    ScatterElements ScatterND Selu Shrink Sigmoid Sign Sin Sinh Softmax Softplus Softsign Sqrt \
    Tan Tanh ThresholdedRelu Trilu";

/// Ops whose output 0 has the rank and type of input 0 (dims may differ).
const SAME_RANK: &str = "DepthToSpace SpaceToDepth Pad Resize Upsample Tile MaxUnpool LpPool Col2Im";

const BROADCAST: &str = "Add Sub Mul Div Pow Mod PRelu BitShift BitwiseAnd BitwiseOr BitwiseXor Max Min Sum Mean";

const COMPARISON: &str = "Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor";

fn broadcast(shapes: &[&Dims]) -> Dims {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            let dims: Vec<Option<i64>> = shapes
                .iter()
                .filter_map(|s| (i + s.len()).checked_sub(rank).map(|j| s[j]))
                .collect();
            let big = dims.iter().flatten().copied().find(|&d| d != 1);
            match big {
                Some(d) => Some(d),
                None if dims.iter().all(|d| d.is_some()) => Some(1),
                None => None,
            }
        })
        .collect()
}

/// A possibly negative axis as an index into a rank-`rank` shape; None when out of range.
pub(super) fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn slice_len(dim: i64, start: i64, end: i64, step: i64) -> Option<i64> {
    if step == 0 {
        return None;
    }
    let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
    let fix = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
    let len = if step > 0 {
        let s = clamp(fix(start), 0, dim);
        let e = clamp(fix(end), 0, dim);
        (e - s + step - 1).div_euclid(step)
    } else {
        let s = clamp(fix(start), 0, dim - 1);
        let e = clamp(fix(end), -1, dim - 1);
        (s - e + (-step) - 1).div_euclid(-step)
    };
    Some(len.max(0))
}

fn infer_node(n: &Node, facts: &Facts) -> Vec<Fact> {
    let fact = |i: usize| -> Option<&Fact> { n.inputs.get(i).filter(|s| !s.is_empty()).and_then(|s| facts.get(s)) };
    let shape = |i: usize| fact(i).and_then(|f| f.shape.clone());
    let dtype = |i: usize| fact(i).and_then(|f| f.dtype);
    let value = |i: usize| fact(i).and_then(|f| f.value.clone());
    // A fully known integer input, or the attribute of the same name (older opsets).
    let ints = |i: usize, attr: &str| -> Option<Vec<i64>> {
        match n.inputs.get(i).filter(|s| !s.is_empty()) {
            Some(_) => value(i).and_then(|v| v.into_iter().collect()),
            None => n.attr_ints(attr).map(<[i64]>::to_vec),
        }
    };
    let has_input = |i: usize| n.inputs.get(i).is_some_and(|s| !s.is_empty());
    let out = |dtype: Option<i32>, shape: Option<Dims>| Fact {
        dtype,
        shape,
        value: None,
    };
    let unknown_rank = |r: Option<usize>| r.map(|r| vec![None; r]);
    let op = n.op_type.as_str();
    let int64 = Some(DataType::Int64 as i32);
    let boolean = Some(DataType::Bool as i32);

    if listed(SAME_AS_INPUT, op) {
        let mut outs = vec![out(dtype(0), shape(0))];
        match op {
            "Dropout" => outs.push(out(boolean, shape(0))),
            "Identity" => outs[0].value = value(0),
            _ => {}
        }
        return outs;
    }
    if listed(SAME_RANK, op) {
        return vec![out(dtype(0), unknown_rank(shape(0).map(|s| s.len())))];
    }
    if listed(BROADCAST, op) || listed(COMPARISON, op) || op == "Where" {
        let shapes: Vec<Dims> = (0..n.inputs.len()).filter_map(shape).collect();
        let s = (shapes.len() == n.inputs.len()).then(|| broadcast(&shapes.iter().collect::<Vec<_>>()));
        let dt = match op {
            _ if listed(COMPARISON, op) => boolean,
            "Where" => dtype(1),
            _ => dtype(0),
        };
        return vec![out(dt, s)];
    }
    match op {
        "Cast" => {
            let to = n.attr_int("to").map(|t| t as i32);
            let mut f = out(to, shape(0));
            if to.is_some_and(|t| matches!(DataType::try_from(t), Ok(DataType::Int64 | DataType::Int32))) {
                f.value = value(0);
            }
            vec![f]
        }
        "CastLike" => vec![out(dtype(1), shape(0))],
        "QuantizeLinear" => {
            let dt = dtype(2)
                .or_else(|| n.attr_int("output_dtype").filter(|&d| d != 0).map(|d| d as i32))
                .or(Some(DataType::Uint8 as i32));
            vec![out(dt, shape(0))]
        }
        "DequantizeLinear" => vec![out(dtype(1), shape(0))],
        "Shape" => {
            let s = shape(0);
            let (dims, value) = match &s {
                Some(dims) => {
                    let r = dims.len() as i64;
                    let fix = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) };
                    let start = fix(n.attr_int("start").unwrap_or(0)) as usize;
                    let end = fix(n.attr_int("end").unwrap_or(r)) as usize;
                    let v: Dims = if start < end { dims[start..end].to_vec() } else { vec![] };
                    (Some(vec![Some(v.len() as i64)]), Some(v))
                }
                None => (Some(vec![None]), None),
            };
            vec![Fact {
                dtype: int64,
                shape: dims,
                value,
            }]
        }
        "Size" => vec![out(int64, Some(vec![]))],
        "Conv" | "ConvInteger" | "QLinearConv" => {
            let w = if op == "QLinearConv" { 3 } else { 1 };
            let s = shape(0).map(|x| {
                let mut d = vec![None; x.len()];
                if let Some(n0) = x.first() {
                    d[0] = *n0;
                }
                if x.len() > 1 {
                    d[1] = shape(w).and_then(|w| w.first().copied().flatten());
                }
                d
            });
            let dt = match op {
                "Conv" => dtype(0),
                "ConvInteger" => Some(DataType::Int32 as i32),
                _ => dtype(7),
            };
            vec![out(dt, s)]
        }
        "ConvTranspose" => {
            let group = n.attr_int("group").unwrap_or(1);
            let s = shape(0).map(|x| {
                let mut d = vec![None; x.len()];
                if let Some(n0) = x.first() {
                    d[0] = *n0;
                }
                if x.len() > 1 {
                    d[1] = shape(1).and_then(|w| w.get(1).copied().flatten()).map(|c| c * group);
                }
                d
            });
            vec![out(dtype(0), s)]
        }
        "MaxPool" | "AveragePool" => {
            let s = shape(0).map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { *d } else { None })
                    .collect::<Dims>()
            });
            vec![out(dtype(0), s.clone()), out(int64, s)]
        }
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let s = shape(0).map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { *d } else { Some(1) })
                    .collect()
            });
            vec![out(dtype(0), s)]
        }
        "MatMul" | "MatMulInteger" | "QLinearMatMul" => {
            let (a, b) = if op == "QLinearMatMul" {
                (shape(0), shape(3))
            } else {
                (shape(0), shape(1))
            };
            let s = match (a, b) {
                (Some(a), Some(b)) => match (a.len(), b.len()) {
                    (0, _) | (_, 0) => None,
                    (1, 1) => Some(vec![]),
                    (1, rb) => {
                        let mut d = b[..rb - 2].to_vec();
                        d.push(b[rb - 1]);
                        Some(d)
                    }
                    (ra, 1) => Some(a[..ra - 1].to_vec()),
                    (ra, rb) => {
                        let mut d = broadcast(&[&a[..ra - 2].to_vec(), &b[..rb - 2].to_vec()]);
                        d.push(a[ra - 2]);
                        d.push(b[rb - 1]);
                        Some(d)
                    }
                },
                _ => None,
            };
            let dt = match op {
                "MatMul" => dtype(0),
                "MatMulInteger" => Some(DataType::Int32 as i32),
                _ => dtype(7),
            };
            vec![out(dt, s)]
        }
        "Gemm" => {
            let m = shape(0)
                .filter(|a| a.len() == 2)
                .and_then(|a| a[n.attr_int("transA").unwrap_or(0).clamp(0, 1) as usize]);
            let nn = shape(1)
                .filter(|b| b.len() == 2)
                .and_then(|b| b[1 - n.attr_int("transB").unwrap_or(0).clamp(0, 1) as usize]);
            vec![out(dtype(0), Some(vec![m, nn]))]
        }
        "Flatten" => {
            let s = shape(0).and_then(|x| {
                let r = x.len();
                let axis = n.attr_int("axis").unwrap_or(1);
                let axis = if axis < 0 { axis + r as i64 } else { axis };
                if !(0..=r as i64).contains(&axis) {
                    return None;
                }
                let prod = |d: &[Option<i64>]| d.iter().try_fold(1i64, |p, d| d.map(|d| p * d));
                Some(vec![prod(&x[..axis as usize]), prod(&x[axis as usize..])])
            });
            vec![out(dtype(0), s.or(Some(vec![None, None])))]
        }
        "Reshape" => {
            let target = value(1).or_else(|| {
                // The shape input's length alone gives the rank.
                shape(1).and_then(|s| match s.as_slice() {
                    [Some(len)] => Some(vec![None; *len as usize]),
                    _ => None,
                })
            });
            let s = target.map(|t| {
                let input = shape(0);
                let allowzero = n.attr_int("allowzero").unwrap_or(0) != 0;
                let mut d: Dims = t
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Some(0) if !allowzero => input.as_ref().and_then(|x| x.get(i).copied().flatten()),
                        Some(-1) => None,
                        v => *v,
                    })
                    .collect();
                if let (Some(pos), Some(total)) = (
                    t.iter().position(|v| *v == Some(-1)),
                    input
                        .as_ref()
                        .and_then(|x| x.iter().try_fold(1i64, |p, d| d.map(|d| p * d))),
                ) {
                    let others: Option<i64> = d
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != pos)
                        .try_fold(1i64, |p, (_, d)| d.map(|d| p * d));
                    if let Some(o) = others.filter(|&o| o > 0) {
                        d[pos] = Some(total / o);
                    }
                }
                d
            });
            let mut f = out(dtype(0), s);
            if f.shape.as_ref().is_some_and(|s| s.len() <= 1) {
                f.value = value(0);
            }
            vec![f]
        }
        "Transpose" => {
            let s = shape(0).map(|x| {
                let perm = n
                    .attr_ints("perm")
                    .map(<[i64]>::to_vec)
                    .unwrap_or_else(|| (0..x.len() as i64).rev().collect());
                perm.iter().map(|&p| x.get(p as usize).copied().flatten()).collect()
            });
            vec![out(dtype(0), s)]
        }
        "Squeeze" => {
            let axes = ints(1, "axes");
            let s = shape(0).and_then(|x| match &axes {
                Some(axes) => {
                    let axes: Option<Vec<usize>> = axes.iter().map(|&a| normalize_axis(a, x.len())).collect();
                    axes.map(|axes| {
                        x.iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, d)| *d)
                            .collect()
                    })
                }
                None if !has_input(1) && x.iter().all(|d| d.is_some()) => {
                    Some(x.iter().filter(|d| **d != Some(1)).copied().collect())
                }
                None => None,
            });
            let mut f = out(dtype(0), s);
            f.value = value(0);
            vec![f]
        }
        "Unsqueeze" => {
            let axes = ints(1, "axes");
            let s = match (shape(0), axes) {
                (Some(x), Some(axes)) => {
                    let r = x.len() + axes.len();
                    let axes: Option<Vec<usize>> = axes.iter().map(|&a| normalize_axis(a, r)).collect();
                    axes.map(|axes| {
                        let mut rest = x.iter();
                        (0..r)
                            .map(|i| {
                                if axes.contains(&i) {
                                    Some(1)
                                } else {
                                    rest.next().copied().flatten()
                                }
                            })
                            .collect()
                    })
                }
                _ => None,
            };
            let mut f = out(dtype(0), s);
            f.value = value(0);
            vec![f]
        }
        "Concat" => {
            let shapes: Option<Vec<Dims>> = (0..n.inputs.len()).map(shape).collect();
            let s = shapes.and_then(|shapes| {
                let r = shapes.first()?.len();
                if shapes.iter().any(|s| s.len() != r) {
                    return None;
                }
                let axis = normalize_axis(n.attr_int("axis").unwrap_or(0), r)?;
                Some(
                    (0..r)
                        .map(|i| {
                            if i == axis {
                                shapes.iter().try_fold(0i64, |acc, s| s[i].map(|d| acc + d))
                            } else {
                                shapes.iter().find_map(|s| s[i])
                            }
                        })
                        .collect(),
                )
            });
            let mut f = out(dtype(0), s);
            let values: Option<Vec<Dims>> = (0..n.inputs.len()).map(value).collect();
            if let Some(values) = values {
                if f.shape.as_ref().is_some_and(|s| s.len() == 1) {
                    f.value = Some(values.concat());
                }
            }
            vec![f]
        }
        "Split" => {
            let count = n.outputs.len();
            let x = shape(0);
            let axis = x
                .as_ref()
                .and_then(|x| normalize_axis(n.attr_int("axis").unwrap_or(0), x.len()));
            let sizes: Option<Vec<i64>> = ints(1, "split").or_else(|| {
                let d = (*x.as_ref()?.get(axis?)?)?;
                let parts = n.attr_int("num_outputs").unwrap_or(count as i64);
                (parts > 0 && d % parts == 0).then(|| vec![d / parts; parts as usize])
            });
            (0..count)
                .map(|i| {
                    let s = x.as_ref().map(|x| {
                        let mut d = x.clone();
                        if let Some(a) = axis {
                            d[a] = sizes.as_ref().and_then(|s| s.get(i).copied());
                        }
                        d
                    });
                    out(dtype(0), s)
                })
                .collect()
        }
        "Slice" => {
            let x = shape(0);
            let starts = ints(1, "starts");
            let ends = ints(2, "ends");
            let axes = ints(3, "axes");
            let steps = ints(4, "steps");
            let s = x.as_ref().map(|x| {
                let mut d = x.clone();
                let (Some(starts), Some(ends)) = (&starts, &ends) else {
                    return vec![None; x.len()];
                };
                let axes = if has_input(3) || n.attribute("axes").is_some() {
                    match &axes {
                        Some(a) => a.clone(),
                        None => return vec![None; x.len()],
                    }
                } else {
                    (0..starts.len() as i64).collect()
                };
                let steps = if has_input(4) {
                    match &steps {
                        Some(s) => s.clone(),
                        None => return vec![None; x.len()],
                    }
                } else {
                    vec![1; starts.len()]
                };
                for (k, &a) in axes.iter().enumerate() {
                    let Some(a) = normalize_axis(a, x.len()) else {
                        return vec![None; x.len()];
                    };
                    d[a] = match (x[a], starts.get(k), ends.get(k), steps.get(k)) {
                        (Some(dim), Some(&s), Some(&e), Some(&st)) => slice_len(dim, s, e, st),
                        _ => None,
                    };
                }
                d
            });
            let mut f = out(dtype(0), s);
            // A 1-D slice with step 1 of known values (shape arithmetic).
            if let (Some(v), Some(starts), Some(ends)) = (value(0), &starts, &ends) {
                let steps_one = !has_input(4) || steps.as_ref().is_some_and(|s| s.iter().all(|&s| s == 1));
                if x.as_ref().is_some_and(|x| x.len() == 1) && starts.len() == 1 && steps_one {
                    let len = v.len() as i64;
                    if let Some(l) = slice_len(len, starts[0], ends[0], 1) {
                        let s = if starts[0] < 0 {
                            (starts[0] + len).max(0)
                        } else {
                            starts[0].min(len)
                        };
                        f.value = Some(v[s as usize..(s + l) as usize].to_vec());
                    }
                }
            }
            vec![f]
        }
        "Gather" => {
            let x = shape(0);
            let idx = shape(1);
            let s = match (&x, &idx) {
                (Some(x), Some(idx)) => normalize_axis(n.attr_int("axis").unwrap_or(0), x.len()).map(|a| {
                    let mut d = x[..a].to_vec();
                    d.extend(idx.iter().copied());
                    d.extend(x[a + 1..].iter().copied());
                    d
                }),
                _ => None,
            };
            let mut f = out(dtype(0), s);
            if let (Some(v), Some(i)) = (value(0), ints(1, "")) {
                if x.as_ref().is_some_and(|x| x.len() == 1) {
                    let len = v.len() as i64;
                    f.value = i
                        .iter()
                        .map(|&i| {
                            let i = if i < 0 { i + len } else { i };
                            v.get(usize::try_from(i).ok()?).copied()
                        })
                        .collect();
                }
            }
            vec![f]
        }
        "GatherElements" => vec![out(dtype(0), shape(1))],
        "Expand" => {
            let s = match (shape(0), value(1)) {
                (Some(x), Some(t)) => Some(broadcast(&[&x, &t])),
                (Some(x), None) => shape(1).and_then(|s| match s.as_slice() {
                    [Some(len)] => Some(vec![None; (*len as usize).max(x.len())]),
                    _ => None,
                }),
                _ => None,
            };
            vec![out(dtype(0), s)]
        }
        "ConstantOfShape" => {
            let dt = n
                .attribute("value")
                .and_then(|a| a.t.as_ref())
                .map(|t| t.data_type())
                .or(Some(DataType::Float as i32));
            let s = value(0).or_else(|| {
                shape(0).and_then(|s| match s.as_slice() {
                    [Some(len)] => Some(vec![None; *len as usize]),
                    _ => None,
                })
            });
            vec![out(dt, s)]
        }
        "ReduceL1" | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceMax" | "ReduceMean" | "ReduceMin"
        | "ReduceProd" | "ReduceSum" | "ReduceSumSquare" | "ArgMax" | "ArgMin" => {
            let keep = n.attr_int("keepdims").unwrap_or(1) != 0;
            let is_arg = op.starts_with("Arg");
            let axes: Option<Vec<i64>> = if is_arg {
                Some(vec![n.attr_int("axis").unwrap_or(0)])
            } else if has_input(1) {
                value(1).and_then(|v| v.into_iter().collect())
            } else {
                Some(n.attr_ints("axes").map(<[i64]>::to_vec).unwrap_or_default())
            };
            let noop = n.attr_int("noop_with_empty_axes").unwrap_or(0) != 0;
            let s = shape(0).and_then(|x| {
                let r = x.len();
                let axes: Vec<usize> = match &axes {
                    Some(a) if a.is_empty() && noop => return Some(x.clone()),
                    Some(a) if a.is_empty() => (0..r).collect(),
                    Some(a) => a.iter().map(|&a| normalize_axis(a, r)).collect::<Option<_>>()?,
                    None if keep => return Some(vec![None; r]),
                    None => return None,
                };
                Some(if keep {
                    x.iter()
                        .enumerate()
                        .map(|(i, d)| if axes.contains(&i) { Some(1) } else { *d })
                        .collect()
                } else {
                    x.iter()
                        .enumerate()
                        .filter(|(i, _)| !axes.contains(i))
                        .map(|(_, d)| *d)
                        .collect()
                })
            });
            vec![out(if is_arg { int64 } else { dtype(0) }, s)]
        }
        "TopK" => {
            let k = ints(1, "").and_then(|k| k.first().copied()).or_else(|| n.attr_int("k"));
            let s = shape(0).map(|x| {
                let mut d = x.clone();
                if let Some(a) = normalize_axis(n.attr_int("axis").unwrap_or(-1), x.len()) {
                    d[a] = k;
                }
                d
            });
            vec![out(dtype(0), s.clone()), out(int64, s)]
        }
        "NonZero" => vec![out(int64, shape(0).map(|x| vec![Some(x.len() as i64), None]))],
        "Range" => vec![out(dtype(0), Some(vec![None]))],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_slice_lengths() {
        let s = |d: &[Option<i64>]| d.to_vec();
        assert_eq!(
            broadcast(&[&s(&[Some(2), Some(1)]), &s(&[Some(3)])]),
            [Some(2), Some(3)]
        );
        assert_eq!(
            broadcast(&[&s(&[None, Some(1)]), &s(&[Some(1), Some(4)])]),
            [None, Some(4)]
        );
        assert_eq!(slice_len(10, 1, i64::MAX, 1), Some(9));
        assert_eq!(slice_len(5, 0, 5, 2), Some(3));
        assert_eq!(slice_len(10, -1, -11, -1), Some(10));
        assert_eq!(slice_len(10, 0, 1, 0), None);
        assert_eq!(normalize_axis(-1, 3), Some(2));
        assert_eq!(normalize_axis(3, 3), None);
    }

    #[test]
    fn a_node_is_inferred_from_its_inputs_facts() {
        let fact = |shape: &[i64]| Fact {
            dtype: Some(DataType::Float as i32),
            shape: Some(shape.iter().map(|&d| Some(d)).collect()),
            value: None,
        };
        let facts: Facts = [("x".to_string(), fact(&[2, 3, 4]))].into_iter().collect();
        // Transpose without perm reverses the dims.
        let t = Node::new("t", "Transpose", vec!["x".into()], "y", 0);
        let out = infer_node(&t, &facts);
        assert_eq!(out[0].shape, Some(vec![Some(4), Some(3), Some(2)]));
        assert_eq!(out[0].dtype, Some(DataType::Float as i32));
        // Shape gives the dims as values, sliced by start/end.
        let s = Node::new("s", "Shape", vec!["x".into()], "sh", 0);
        let out = infer_node(&s, &facts);
        assert_eq!(out[0].value, Some(vec![Some(2), Some(3), Some(4)]));
        assert_eq!(out[0].shape, Some(vec![Some(3)]));
        // Unknown ops infer nothing.
        assert!(infer_node(&Node::new("c", "Custom", vec!["x".into()], "z", 0), &facts).is_empty());
    }
}
