//! A stable text dump of a model for snapshots and `--dump-after`: topological order with ties
//! broken by original order, sorted attributes, large tensors as shape + min/max + a stable
//! hash, every float through [`fmt_float`]. Node indices never appear.

use std::fmt::{self, Write};

use crate::ir::{tensor, ConstantOrigin, Graph, Model};
use crate::proto::attribute_proto::AttributeType;
use crate::proto::{AttributeProto, TensorProto, TypeProto, ValueInfoProto};

/// Tensors with at most this many elements are printed in full.
const INLINE_ELEMENTS: u64 = 8;

/// The one float format of dumps: 6 significant digits, trailing zeros trimmed, exponent
/// form outside [1e-4, 1e6).
pub fn fmt_float(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let a = v.abs();
    if (1e-4..1e6).contains(&a) {
        let digits = (5 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s == "-0" {
            "0".into()
        } else {
            s
        }
    } else {
        let s = format!("{v:.5e}");
        let (m, e) = s.split_once('e').unwrap();
        let m = if m.contains('.') {
            m.trim_end_matches('0').trim_end_matches('.')
        } else {
            m
        };
        format!("{m}e{e}")
    }
}

pub fn fmt_type(t: Option<&TypeProto>) -> String {
    use crate::proto::tensor_shape_proto::dimension::Value as Dim;
    use crate::proto::type_proto::Value;
    match t.and_then(|t| t.value.as_ref()) {
        Some(Value::TensorType(tt)) => {
            let dt = tensor::dtype_name(tt.elem_type());
            match &tt.shape {
                None => format!("{dt}[?]"),
                Some(s) => {
                    let dims: Vec<String> = s
                        .dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(Dim::DimValue(v)) => v.to_string(),
                            Some(Dim::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect();
                    format!("{dt}[{}]", dims.join(","))
                }
            }
        }
        Some(Value::SequenceType(_)) => "sequence".into(),
        Some(Value::MapType(_)) => "map".into(),
        Some(Value::OptionalType(_)) => "optional".into(),
        Some(Value::SparseTensorType(_)) => "sparse".into(),
        Some(Value::OpaqueType(_)) => "opaque".into(),
        None => "?".into(),
    }
}

fn fmt_value_info(v: &ValueInfoProto) -> String {
    format!("{}: {}", v.name(), fmt_type(v.r#type.as_ref()))
}

/// `f32[3,4] min=.. max=.. #hash`, or the values themselves for small tensors.
pub fn fmt_tensor(t: &TensorProto) -> String {
    let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
    let head = format!("{}[{}]", tensor::dtype_name(t.data_type()), dims.join(","));
    let n = tensor::element_count(t);
    if t.data_type() == crate::proto::tensor_proto::DataType::String as i32 {
        let strings: Vec<String> = t
            .string_data
            .iter()
            .take(INLINE_ELEMENTS as usize)
            .map(|s| format!("{:?}", String::from_utf8_lossy(s)))
            .collect();
        return format!("{head} = [{}]", strings.join(", "));
    }
    if let Some(v) = tensor::values_i128(t) {
        return match (v.iter().min(), v.iter().max()) {
            _ if n <= INLINE_ELEMENTS => {
                format!(
                    "{head} = [{}]",
                    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
                )
            }
            (Some(min), Some(max)) => format!("{head} min={min} max={max} #{:016x}", tensor::content_hash(t)),
            _ => format!("{head} #{:016x}", tensor::content_hash(t)),
        };
    }
    match tensor::values_f64(t) {
        Some(v) if n <= INLINE_ELEMENTS => {
            let vals: Vec<String> = v.iter().map(|x| fmt_float(*x)).collect();
            format!("{head} = [{}]", vals.join(", "))
        }
        Some(v) => {
            let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            format!(
                "{head} min={} max={} #{:016x}",
                fmt_float(min),
                fmt_float(max),
                tensor::content_hash(t)
            )
        }
        None => format!("{head} #{:016x}", tensor::content_hash(t)),
    }
}

fn fmt_attribute(a: &AttributeProto) -> String {
    let floats = |v: &[f32]| v.iter().map(|x| fmt_float(*x as f64)).collect::<Vec<_>>().join(",");
    let value = match a.r#type() {
        AttributeType::Float => fmt_float(a.f() as f64),
        AttributeType::Int => a.i().to_string(),
        AttributeType::String => format!("{:?}", String::from_utf8_lossy(a.s())),
        AttributeType::Tensor => a.t.as_ref().map(fmt_tensor).unwrap_or_default(),
        AttributeType::Graph => {
            let g = a.g.as_ref();
            format!(
                "<graph {} nodes={}>",
                g.map(|g| g.name()).unwrap_or(""),
                g.map(|g| g.node.len()).unwrap_or(0)
            )
        }
        AttributeType::Floats => format!("[{}]", floats(&a.floats)),
        AttributeType::Ints => format!(
            "[{}]",
            a.ints.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        ),
        AttributeType::Strings => {
            format!(
                "[{}]",
                a.strings
                    .iter()
                    .map(|s| format!("{:?}", String::from_utf8_lossy(s)))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
        AttributeType::Tensors => format!("<{} tensors>", a.tensors.len()),
        AttributeType::Graphs => format!("<{} graphs>", a.graphs.len()),
        other => format!("<{}>", other.as_str_name()),
    };
    if let Some(r) = &a.ref_attr_name {
        return format!("{}=@{r}", a.name());
    }
    format!("{}={value}", a.name())
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut opsets: Vec<String> = self
            .header
            .opset_import
            .iter()
            .map(|o| {
                format!(
                    "{}:{}",
                    if o.domain().is_empty() { "ai.onnx" } else { o.domain() },
                    o.version()
                )
            })
            .collect();
        opsets.sort();
        writeln!(
            f,
            "model ir_version={} opsets=[{}]",
            self.header.ir_version(),
            opsets.join(", ")
        )?;
        if !self.header.functions.is_empty() {
            let mut names: Vec<String> = self
                .header
                .functions
                .iter()
                .map(|fun| format!("{}.{}", fun.domain(), fun.name()))
                .collect();
            names.sort();
            writeln!(f, "functions [{}]", names.join(", "))?;
        }
        write!(f, "{}", self.graph)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in self.runtime_inputs() {
            writeln!(f, "input  {}", fmt_value_info(i))?;
        }
        for o in &self.outputs {
            writeln!(f, "output {}", fmt_value_info(o))?;
        }
        for (name, c) in &self.constants {
            let origin = match c.origin {
                ConstantOrigin::Initializer { .. } => "",
                ConstantOrigin::ConstantNode { .. } => " (Constant node)",
                ConstantOrigin::Created => " (created)",
            };
            writeln!(f, "const  {name}: {}{origin}", fmt_tensor(&c.tensor))?;
        }
        let order = self.topological_order().map_err(|_| fmt::Error)?;
        for ix in order {
            let n = &self.nodes[ix];
            let mut line = String::new();
            let op = if n.is_default_domain() {
                n.op_type.clone()
            } else {
                format!("{}.{}", n.domain, n.op_type)
            };
            let name = if n.name.is_empty() {
                String::new()
            } else {
                format!("{} ", n.name)
            };
            write!(
                line,
                "node   {name}= {op}({}) -> {}",
                n.inputs.join(", "),
                n.outputs.join(", ")
            )?;
            let mut attrs: Vec<String> = n.attributes.iter().map(fmt_attribute).collect();
            attrs.sort();
            if !attrs.is_empty() {
                write!(line, " {{{}}}", attrs.join(", "))?;
            }
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_float;

    #[test]
    fn floats_format_stably() {
        assert_eq!(fmt_float(0.0), "0");
        assert_eq!(fmt_float(-0.0), "0");
        assert_eq!(fmt_float(1.0), "1");
        assert_eq!(fmt_float(0.1f32 as f64), "0.1");
        assert_eq!(fmt_float(123.456789), "123.457");
        assert_eq!(fmt_float(-2.5e-7), "-2.5e-7");
        assert_eq!(fmt_float(3.0e38), "3e38");
        assert_eq!(fmt_float(f64::NEG_INFINITY), "-inf");
    }
}
