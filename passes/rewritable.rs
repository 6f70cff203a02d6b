//! Whether a pass may rewrite a constant in place: the checks (and their messages) shared by
//! fold_batchnorm and equalize; and the rewritten constant itself ([`f32_tensor`]).

use petgraph::stable_graph::NodeIndex;

use crate::ir::tensor;
use crate::ir::Graph;
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;

/// The tensor with new f32 values (rounded from f64 to nearest; f32 values are kept exactly),
/// keeping its name, dims and other fields; stored in `raw_data`.
pub fn f32_tensor<T: Copy + Into<f64>>(old: &TensorProto, values: &[T]) -> TensorProto {
    TensorProto {
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| ((*v).into() as f32).to_le_bytes()).collect()),
        float_data: Vec::new(),
        external_data: Vec::new(),
        data_location: None,
        ..old.clone()
    }
}

pub fn is_graph_output(graph: &Graph, t: &str) -> bool {
    graph.outputs.iter().any(|o| o.name() == t)
}

pub fn read_in_subgraph(graph: &Graph, t: &str) -> bool {
    graph
        .nodes
        .node_weights()
        .any(|n| n.implicit_inputs.iter().any(|i| i == t))
}

/// Why a tensor read by `reader` cannot be rewritten in place: another reader, a graph output or
/// a read inside a subgraph would see the new value.
pub fn shared_reason(graph: &Graph, t: &str, reader: NodeIndex) -> Option<String> {
    let readers = graph.consumers(t);
    if let Some(&(other, _)) = readers.iter().find(|&&(ix, _)| ix != reader) {
        return Some(format!("'{t}' is also read by {}", graph.nodes[other].label()));
    }
    if readers.len() > 1 {
        return Some(format!("'{t}' is read twice by {}", graph.nodes[reader].label()));
    }
    if is_graph_output(graph, t) {
        return Some(format!("'{t}' is a graph output"));
    }
    if read_in_subgraph(graph, t) {
        return Some(format!("'{t}' is read inside a subgraph"));
    }
    None
}

/// An f32 constant a pass may rewrite: fixed, and read only by `reader` (once); its values.
pub fn own_f32_constant(
    graph: &Graph,
    t: &str,
    reader: NodeIndex,
    what: &str,
) -> std::result::Result<Vec<f64>, String> {
    if graph.inputs.iter().any(|i| i.name() == t) {
        return Err(format!("{what} '{t}' is a graph input (a runtime may override it)"));
    }
    let Some(c) = graph.constants.get(t) else {
        return Err(format!("{what} '{t}' is not a constant"));
    };
    if c.tensor.data_type() != DataType::Float as i32 {
        return Err(format!(
            "{what} '{t}' is {}, not f32",
            tensor::dtype_name(c.tensor.data_type())
        ));
    }
    if let Some(reason) = shared_reason(graph, t, reader) {
        return Err(format!("{what} {reason}"));
    }
    let values = tensor::values_f64(&c.tensor).ok_or_else(|| format!("{what} '{t}' has no readable values"))?;
    if values.len() as u64 != tensor::element_count(&c.tensor) {
        return Err(format!("{what} '{t}' holds {} values for its shape", values.len()));
    }
    Ok(values)
}
