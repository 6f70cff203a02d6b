//! `onnxq inspect`: what a model is made of and what onnxq can and cannot do with it.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::ir::{dump, tensor, Model};
use crate::proto::TypeProto;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub ir_version: i64,
    pub producer: String,
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
    /// (op type, count), most frequent first.
    pub op_histogram: Vec<(String, usize)>,
    pub nodes: usize,
    pub constants: usize,
    /// Elements and bytes of all constants (initializers and Constant nodes).
    pub parameter_count: u64,
    pub parameter_bytes: u64,
    /// Nodes that read float weight tensors: (node, [weight tensor with its type]).
    pub weighted_nodes: Vec<(String, Vec<String>)>,
    /// What onnxq cannot handle or only carries through, one line each.
    pub limitations: Vec<String>,
}

fn type_string(t: Option<&TypeProto>) -> String {
    dump::fmt_type(t)
}

pub fn inspect(model: &Model) -> Inspection {
    let g = &model.graph;
    let mut histogram: BTreeMap<String, usize> = BTreeMap::new();
    let order = g.topological_order().unwrap_or_default();
    let mut weighted_nodes = Vec::new();
    let mut limitations = Vec::new();
    for &ix in &order {
        let n = &g.nodes[ix];
        let op = if n.is_default_domain() {
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        *histogram.entry(op).or_default() += 1;
        let weights: Vec<String> = n
            .inputs
            .iter()
            .filter_map(|i| g.constants.get(i))
            .filter(|c| tensor::is_float(c.tensor.data_type()) && tensor::element_count(&c.tensor) > 1)
            .map(|c| {
                let dims: Vec<String> = c.tensor.dims.iter().map(|d| d.to_string()).collect();
                format!(
                    "{} {}[{}]",
                    c.tensor.name(),
                    tensor::dtype_name(c.tensor.data_type()),
                    dims.join(",")
                )
            })
            .collect();
        if !weights.is_empty() {
            weighted_nodes.push((n.label(), weights));
        }
        if n.attributes.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
            limitations.push(format!(
                "{}: has subgraphs, carried through untouched (passes do not look inside)",
                n.label()
            ));
        }
    }
    let mut op_histogram: Vec<(String, usize)> = histogram.into_iter().collect();
    op_histogram.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));

    let mut custom: Vec<String> = g
        .nodes
        .node_weights()
        .filter(|n| !n.is_default_domain() && n.domain != "ai.onnx.ml")
        .map(|n| format!("{}.{}", n.domain, n.op_type))
        .collect();
    custom.sort();
    custom.dedup();
    for op in custom {
        limitations.push(format!(
            "op {op} is outside the ONNX standard: carried through untouched, never quantized"
        ));
    }
    for op in crate::runtime::unsupported_ops(model) {
        limitations.push(format!(
            "op {op} cannot run in tract: calibration and verification of this model are not possible"
        ));
    }
    if !g.header.sparse_initializer.is_empty() {
        limitations.push(format!(
            "{} sparse initializers: carried through, not visible to passes",
            g.header.sparse_initializer.len()
        ));
    }
    if !model.header.training_info.is_empty() {
        limitations.push("training info: carried through untouched".into());
    }
    if !model.header.functions.is_empty() {
        limitations.push(format!(
            "{} local functions: carried through, calls to them are opaque to passes",
            model.header.functions.len()
        ));
    }
    for i in g.runtime_inputs() {
        let is_tensor = matches!(
            i.r#type.as_ref().and_then(|t| t.value.as_ref()),
            Some(crate::proto::type_proto::Value::TensorType(_))
        );
        if !is_tensor {
            limitations.push(format!("input '{}' is not a tensor: onnxq cannot feed it", i.name()));
        }
    }

    let (parameter_count, parameter_bytes) = g.constants.values().fold((0, 0), |(n, b), c| {
        (n + tensor::element_count(&c.tensor), b + tensor::byte_size(&c.tensor))
    });
    let mut opsets: Vec<(String, i64)> = model
        .header
        .opset_import
        .iter()
        .map(|o| {
            (
                if o.domain().is_empty() {
                    "ai.onnx".to_string()
                } else {
                    o.domain().to_string()
                },
                o.version(),
            )
        })
        .collect();
    opsets.sort();
    let producer = format!("{} {}", model.header.producer_name(), model.header.producer_version())
        .trim()
        .to_string();
    Inspection {
        ir_version: model.header.ir_version(),
        producer,
        opsets,
        inputs: g
            .runtime_inputs()
            .map(|v| (v.name().to_string(), type_string(v.r#type.as_ref())))
            .collect(),
        outputs: g
            .outputs
            .iter()
            .map(|v| (v.name().to_string(), type_string(v.r#type.as_ref())))
            .collect(),
        op_histogram,
        nodes: g.nodes.node_count(),
        constants: g.constants.len(),
        parameter_count,
        parameter_bytes,
        weighted_nodes,
        limitations,
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        writeln!(s, "IR version   {}", self.ir_version)?;
        if !self.producer.is_empty() {
            writeln!(s, "producer     {}", self.producer)?;
        }
        let opsets: Vec<String> = self.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
        writeln!(s, "opsets       {}", opsets.join(", "))?;
        for (name, t) in &self.inputs {
            writeln!(s, "input        {name}: {t}")?;
        }
        for (name, t) in &self.outputs {
            writeln!(s, "output       {name}: {t}")?;
        }
        writeln!(
            s,
            "nodes        {} compute nodes, {} constants",
            self.nodes, self.constants
        )?;
        writeln!(
            s,
            "parameters   {} elements, {}",
            self.parameter_count,
            human_bytes(self.parameter_bytes)
        )?;
        writeln!(s, "ops")?;
        for (op, count) in &self.op_histogram {
            writeln!(s, "  {count:>5}  {op}")?;
        }
        writeln!(s, "weighted nodes ({})", self.weighted_nodes.len())?;
        for (node, weights) in &self.weighted_nodes {
            writeln!(s, "  {node}: {}", weights.join(", "))?;
        }
        if self.limitations.is_empty() {
            writeln!(
                s,
                "limitations  none: onnxq can read, rewrite, run and write every part of this model"
            )?;
        } else {
            writeln!(s, "limitations")?;
            for l in &self.limitations {
                writeln!(s, "  - {l}")?;
            }
        }
        f.write_str(&s)
    }
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
