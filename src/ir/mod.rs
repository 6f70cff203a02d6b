//! The IR: an ONNX graph on a petgraph `StableGraph`.
//!
//! - Compute nodes are graph nodes; an edge carries the tensor name and the producer's output slot
//!   and consumer's input slot. Node indices are never printed or kept across passes: anything that
//!   lives across passes is keyed by tensor name.
//! - Constants are not nodes: initializers and the values of `Constant` nodes are both in
//!   [`Graph::constants`], keyed by tensor name, so passes see one kind of weight. Each remembers
//!   its origin so that export writes it back the way it came.
//! - Ops are open-ended (domain, op type, attributes); an op nobody knows passes through untouched.
//!   Subgraph attributes (If/Loop/Scan bodies) and local functions are carried as protos; the names
//!   a subgraph captures from the outer scope become implicit inputs, so ordering stays correct.

pub mod attribute;
pub mod batchnorm;
pub mod dump;
pub mod inline;
pub mod ops;
pub mod tensor;

pub use batchnorm::BatchNormRecord;

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::Direction;

use crate::error::{Error, Result};
use crate::proto::{self, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

/// A whole model: everything of the ModelProto but the graph is kept verbatim in `header`.
#[derive(Clone, Debug)]
pub struct Model {
    /// The ModelProto with `graph` taken out: IR version, opset imports, producer, metadata,
    /// local functions, training info, device configurations.
    pub header: ModelProto,
    pub graph: Graph,
}

#[derive(Clone, Debug)]
pub struct Graph {
    /// The GraphProto with nodes, initializers, inputs, outputs and value_info taken out: name,
    /// doc string, sparse initializers, quantization annotations, metadata.
    pub header: GraphProto,
    /// Graph inputs in declared order. An input that also has an initializer (IR < 4 style) is an
    /// overridable constant: it is listed here and in `constants`.
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    pub value_info: Vec<ValueInfoProto>,
    pub constants: BTreeMap<String, Constant>,
    pub nodes: StableGraph<Node, Edge>,
}

#[derive(Clone, Debug)]
pub struct Constant {
    pub tensor: TensorProto,
    pub origin: ConstantOrigin,
}

#[derive(Clone, Debug)]
pub enum ConstantOrigin {
    /// A graph initializer; `order` is its position in the initializer list.
    Initializer { order: usize },
    /// The output of a `Constant` node. `node` is the original node, written back as it was
    /// unless a pass replaced the value (`modified`), in which case the value is written as a
    /// `value` tensor attribute.
    ConstantNode {
        node: NodeProto,
        order: u64,
        modified: bool,
    },
    /// Made by a pass: written as an initializer.
    Created,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub domain: String,
    pub op_type: String,
    /// Input tensor names by slot; "" is an omitted optional input.
    pub inputs: Vec<String>,
    /// Output tensor names by slot; "" is an omitted optional output.
    pub outputs: Vec<String>,
    /// In the order they were read; dumps sort them.
    pub attributes: Vec<AttributeProto>,
    /// Outer-scope tensors read inside subgraph attributes, sorted.
    pub implicit_inputs: Vec<String>,
    /// The NodeProto as read, for the fields not above (doc string, overload, metadata, device
    /// configurations); inputs, outputs and attributes are moved out of it.
    pub extra: NodeProto,
    /// Position key: the original node order, so export and dumps break topological ties the
    /// same way every time. Nodes created by passes take the key of the node they belong to.
    pub order: u64,
}

/// An edge from a producer to a consumer of `tensor`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub tensor: String,
    pub from_slot: usize,
    /// None when the tensor is read inside a subgraph attribute of the consumer.
    pub to_slot: Option<usize>,
}

/// Gap between original node order keys, so passes can place new nodes in between.
pub const ORDER_STEP: u64 = 1 << 16;

impl Node {
    /// A default-domain node with one output and no attributes, at order key `order`.
    pub fn new(name: &str, op: &str, inputs: Vec<String>, output: &str, order: u64) -> Node {
        Node {
            name: name.to_string(),
            domain: String::new(),
            op_type: op.to_string(),
            inputs,
            outputs: vec![output.to_string()],
            attributes: vec![],
            implicit_inputs: vec![],
            extra: Default::default(),
            order,
        }
    }
    pub fn attribute(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes.iter().find(|a| a.name() == name)
    }
    /// An integer attribute, if present.
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attribute(name).map(|a| a.i())
    }
    /// A float attribute, if present.
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attribute(name).map(|a| a.f())
    }
    /// An integer-list attribute, if present.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attribute(name).map(|a| a.ints.as_slice())
    }
    /// A string attribute, if present (lossily decoded as UTF-8).
    pub fn attr_string(&self, name: &str) -> Option<String> {
        self.attribute(name)
            .map(|a| String::from_utf8_lossy(a.s()).into_owned())
    }
    pub fn is_default_domain(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }
    /// Label for messages: `Conv 'conv1'` or `Conv -> y` for an unnamed node.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!(
                "{} -> {}",
                self.op_type,
                self.outputs.first().map(String::as_str).unwrap_or("?")
            )
        } else {
            format!("{} '{}'", self.op_type, self.name)
        }
    }
}

impl Model {
    /// Builds the IR from a decoded ModelProto (external data already resolved).
    pub fn from_proto(mut proto: ModelProto) -> Result<Model> {
        let graph = proto
            .graph
            .take()
            .ok_or_else(|| Error::Graph("the model has no graph".into()))?;
        Ok(Model {
            header: proto,
            graph: Graph::from_proto(graph)?,
        })
    }

    /// Writes the IR back as a ModelProto. Nodes are in topological order, ties broken by
    /// their order key; value_info with symbolic or unknown dimensions is dropped (tract and
    /// other consumers trip on it; shapes are re-inferable).
    pub fn to_proto(&self) -> Result<ModelProto> {
        let mut proto = self.header.clone();
        proto.graph = Some(self.graph.to_proto()?);
        Ok(proto)
    }

    /// Opset version imported for a domain ("" and "ai.onnx" are the same).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let is_default = |d: &str| d.is_empty() || d == "ai.onnx";
        self.header
            .opset_import
            .iter()
            .find(|o| o.domain() == domain || (is_default(domain) && is_default(o.domain())))
            .map(|o| o.version())
    }
}

/// Output names a node declares (non-empty), and the names inner subgraphs read from outside.
fn subgraph_free_names(graph: &GraphProto, out: &mut BTreeSet<String>) {
    let mut defined: BTreeSet<&str> = BTreeSet::new();
    defined.extend(graph.input.iter().map(|v| v.name()));
    defined.extend(graph.initializer.iter().map(|t| t.name()));
    defined.extend(
        graph
            .sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name())),
    );
    for n in &graph.node {
        defined.extend(n.output.iter().map(String::as_str));
    }
    let mut free = BTreeSet::new();
    for n in &graph.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i.as_str()) {
                free.insert(i.clone());
            }
        }
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                let mut inner = BTreeSet::new();
                subgraph_free_names(g, &mut inner);
                free.extend(inner.into_iter().filter(|i| !defined.contains(i.as_str())));
            }
        }
    }
    for o in &graph.output {
        if !defined.contains(o.name()) {
            free.insert(o.name().to_string());
        }
    }
    out.extend(free);
}

fn implicit_inputs(node: &NodeProto) -> Vec<String> {
    subgraph_reads(&node.attribute)
}

/// The outer-scope names the subgraph attributes read (a node's implicit inputs), sorted.
pub fn subgraph_reads(attributes: &[AttributeProto]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for a in attributes {
        for g in a.g.iter().chain(a.graphs.iter()) {
            subgraph_free_names(g, &mut names);
        }
    }
    names.into_iter().collect()
}

/// Turns a `Constant` node's value attribute (any of its forms) into a tensor.
fn constant_node_value(node: &NodeProto) -> Result<TensorProto> {
    use proto::tensor_proto::DataType;
    let output = node.output.first().cloned().unwrap_or_default();
    let attr = match node.attribute.as_slice() {
        [a] => a,
        _ => {
            return Err(Error::Graph(format!(
                "Constant node producing '{output}' must have exactly one value attribute, has {}",
                node.attribute.len()
            )))
        }
    };
    let mut t = match attr.name() {
        "value" => attr
            .t
            .clone()
            .ok_or_else(|| Error::Graph(format!("Constant '{output}': empty value")))?,
        "value_float" => TensorProto {
            data_type: Some(DataType::Float as i32),
            float_data: vec![attr.f()],
            ..Default::default()
        },
        "value_floats" => TensorProto {
            data_type: Some(DataType::Float as i32),
            dims: vec![attr.floats.len() as i64],
            float_data: attr.floats.clone(),
            ..Default::default()
        },
        "value_int" => TensorProto {
            data_type: Some(DataType::Int64 as i32),
            int64_data: vec![attr.i()],
            ..Default::default()
        },
        "value_ints" => TensorProto {
            data_type: Some(DataType::Int64 as i32),
            dims: vec![attr.ints.len() as i64],
            int64_data: attr.ints.clone(),
            ..Default::default()
        },
        "value_string" => TensorProto {
            data_type: Some(DataType::String as i32),
            string_data: vec![attr.s().to_vec()],
            ..Default::default()
        },
        "value_strings" => TensorProto {
            data_type: Some(DataType::String as i32),
            dims: vec![attr.strings.len() as i64],
            string_data: attr.strings.clone(),
            ..Default::default()
        },
        other => {
            // sparse_value and anything newer: keep it a compute node (see `from_proto`).
            return Err(Error::Graph(format!(
                "Constant '{output}': attribute '{other}' is not a dense value"
            )));
        }
    };
    t.name = Some(output);
    Ok(t)
}

fn is_liftable_constant(n: &NodeProto) -> bool {
    let default_domain = n.domain().is_empty() || n.domain() == "ai.onnx";
    default_domain
        && n.op_type() == "Constant"
        && n.output.len() == 1
        && !n.output[0].is_empty()
        && n.attribute.len() == 1
        && n.attribute[0].name() != "sparse_value"
}

impl Graph {
    /// The value of a one-element constant `name` that is not a graph input (a runtime could
    /// override that).
    pub fn constant_scalar(&self, name: &str) -> Option<f64> {
        if self.inputs.iter().any(|i| i.name() == name) {
            return None;
        }
        match tensor::values_f64(&self.constants.get(name)?.tensor).as_deref() {
            Some([v]) => Some(*v),
            _ => None,
        }
    }

    /// The value of a Clip bound of `node`: input `slot` (opset ≥ 11) or attribute `attr` (min,
    /// max); `Ok(None)` when absent, Err with the reason when not a constant scalar.
    pub fn clip_bound(&self, node: &Node, slot: usize, attr: &str) -> std::result::Result<Option<f64>, String> {
        let Some(name) = node.inputs.get(slot).filter(|s| !s.is_empty()) else {
            return Ok(node.attribute(attr).map(|a| a.f() as f64));
        };
        let label = node.label();
        if self.inputs.iter().any(|i| i.name() == name) {
            return Err(format!("the {attr} '{name}' of {label} is a graph input"));
        }
        if !self.constants.contains_key(name) {
            return Err(format!("the {attr} '{name}' of {label} is not a constant"));
        }
        self.constant_scalar(name)
            .map(Some)
            .ok_or_else(|| format!("the {attr} '{name}' of {label} is not a scalar"))
    }

    pub fn from_proto(mut g: GraphProto) -> Result<Graph> {
        let nodes_proto = std::mem::take(&mut g.node);
        let initializers = std::mem::take(&mut g.initializer);
        let inputs = std::mem::take(&mut g.input);
        let outputs = std::mem::take(&mut g.output);
        let value_info = std::mem::take(&mut g.value_info);

        let mut constants = BTreeMap::new();
        for (order, mut t) in initializers.into_iter().enumerate() {
            let name = t.name().to_string();
            if name.is_empty() {
                return Err(Error::Graph(format!("initializer #{order} has no name")));
            }
            t.name = Some(name.clone());
            if constants
                .insert(
                    name.clone(),
                    Constant {
                        tensor: t,
                        origin: ConstantOrigin::Initializer { order },
                    },
                )
                .is_some()
            {
                return Err(Error::Graph(format!("initializer '{name}' is defined twice")));
            }
        }

        let mut nodes = StableGraph::new();
        for (position, mut n) in nodes_proto.into_iter().enumerate() {
            let order = position as u64 * ORDER_STEP;
            if is_liftable_constant(&n) {
                let tensor = constant_node_value(&n)?;
                let name = n.output[0].clone();
                let origin = ConstantOrigin::ConstantNode {
                    node: n,
                    order,
                    modified: false,
                };
                if constants.insert(name.clone(), Constant { tensor, origin }).is_some() {
                    return Err(Error::Graph(format!(
                        "tensor '{name}' is defined twice (initializer and Constant node)"
                    )));
                }
                continue;
            }
            let implicit = implicit_inputs(&n);
            let node = Node {
                name: n.name.clone().unwrap_or_default(),
                domain: n.domain.clone().unwrap_or_default(),
                op_type: n.op_type.clone().unwrap_or_default(),
                inputs: std::mem::take(&mut n.input),
                outputs: std::mem::take(&mut n.output),
                attributes: std::mem::take(&mut n.attribute),
                implicit_inputs: implicit,
                extra: n,
                order,
            };
            nodes.add_node(node);
        }
        let mut graph = Graph {
            header: g,
            inputs,
            outputs,
            value_info,
            constants,
            nodes,
        };
        graph.rebuild_edges()?;
        Ok(graph)
    }

    /// Which node and output slot produces each tensor.
    pub fn producers(&self) -> HashMap<&str, (NodeIndex, usize)> {
        let mut map = HashMap::new();
        for ix in self.nodes.node_indices() {
            for (slot, out) in self.nodes[ix].outputs.iter().enumerate() {
                if !out.is_empty() {
                    map.insert(out.as_str(), (ix, slot));
                }
            }
        }
        map
    }

    /// Recomputes all edges from the tensor names nodes read and write. Passes that rename
    /// inputs or add nodes call this (the pass manager does after every pass).
    pub fn rebuild_edges(&mut self) -> Result<()> {
        let edges = self.edges_from_names()?;
        self.nodes.clear_edges();
        for (a, b, e) in edges {
            self.nodes.add_edge(a, b, e);
        }
        Ok(())
    }

    /// The edges the node inputs and outputs call for (producer, consumer, edge).
    fn edges_from_names(&self) -> Result<Vec<(NodeIndex, NodeIndex, Edge)>> {
        let mut producers: HashMap<&str, (NodeIndex, usize)> = HashMap::new();
        for ix in self.nodes.node_indices() {
            for (slot, out) in self.nodes[ix].outputs.iter().enumerate() {
                if !out.is_empty() && producers.insert(out, (ix, slot)).is_some() {
                    return Err(Error::Graph(format!(
                        "tensor '{out}' is produced by more than one node"
                    )));
                }
            }
        }
        let mut edges = Vec::new();
        for ix in self.nodes.node_indices() {
            let node = &self.nodes[ix];
            let explicit = node.inputs.iter().enumerate().map(|(s, t)| (t, Some(s)));
            let implicit = node.implicit_inputs.iter().map(|t| (t, None));
            for (tensor, to_slot) in explicit.chain(implicit) {
                if let Some(&(from, from_slot)) = producers.get(tensor.as_str()) {
                    edges.push((
                        from,
                        ix,
                        Edge {
                            tensor: tensor.clone(),
                            from_slot,
                            to_slot,
                        },
                    ));
                }
            }
        }
        Ok(edges)
    }

    /// Consumers of a tensor: (node, input slot), in node order.
    pub fn consumers(&self, tensor: &str) -> Vec<(NodeIndex, usize)> {
        let mut out: Vec<(NodeIndex, usize)> = self
            .nodes
            .node_indices()
            .flat_map(|ix| {
                self.nodes[ix]
                    .inputs
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.as_str() == tensor)
                    .map(move |(slot, _)| (ix, slot))
            })
            .collect();
        out.sort_by_key(|&(ix, slot)| (self.nodes[ix].order, slot));
        out
    }

    /// Topological order, ties broken by order key then by name: deterministic for a given
    /// graph whatever the node indices are. Err on a cycle.
    pub fn topological_order(&self) -> Result<Vec<NodeIndex>> {
        use std::cmp::Reverse;
        let mut pending: HashMap<NodeIndex, usize> = HashMap::new();
        let key = |ix: NodeIndex| {
            let n = &self.nodes[ix];
            Reverse((
                n.order,
                n.name.clone(),
                n.outputs.first().cloned().unwrap_or_default(),
                ix.index(),
            ))
        };
        let mut ready = BinaryHeap::new();
        for ix in self.nodes.node_indices() {
            let count = self.nodes.edges_directed(ix, Direction::Incoming).count();
            if count == 0 {
                ready.push(key(ix));
            } else {
                pending.insert(ix, count);
            }
        }
        let mut order = Vec::with_capacity(self.nodes.node_count());
        while let Some(Reverse((_, _, _, index))) = ready.pop() {
            let ix = NodeIndex::new(index);
            order.push(ix);
            for e in self.nodes.edges_directed(ix, Direction::Outgoing) {
                use petgraph::visit::EdgeRef;
                let next = e.target();
                let count = pending.get_mut(&next).expect("consumer counted");
                *count -= 1;
                if *count == 0 {
                    pending.remove(&next);
                    ready.push(key(next));
                }
            }
        }
        if !pending.is_empty() {
            let mut stuck: Vec<String> = pending.keys().map(|&ix| self.nodes[ix].label()).collect();
            stuck.sort();
            return Err(Error::Graph(format!(
                "the graph has a cycle through {}",
                stuck.join(", ")
            )));
        }
        Ok(order)
    }

    /// Replaces the value of an existing constant (a weight rewritten by a pass), keeping its
    /// name and origin; a `Constant` node is then written back with the new value.
    /// `base`, or `base.1`, `base.2`…: the first tensor name no constant, node output or graph
    /// input uses yet.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| {
            self.constants.contains_key(n)
                || self.inputs.iter().any(|i| i.name() == n)
                || self
                    .nodes
                    .node_weights()
                    .any(|node| node.outputs.iter().any(|o| o == n))
        };
        let mut name = base.to_string();
        let mut k = 1;
        while taken(&name) {
            name = format!("{base}.{k}");
            k += 1;
        }
        name
    }

    pub fn set_constant(&mut self, name: &str, mut tensor: TensorProto) -> Result<()> {
        let c = self
            .constants
            .get_mut(name)
            .ok_or_else(|| Error::Graph(format!("no constant named '{name}'")))?;
        tensor.name = Some(name.to_string());
        if let ConstantOrigin::ConstantNode { modified, .. } = &mut c.origin {
            *modified = true;
        }
        c.tensor = tensor;
        Ok(())
    }

    /// Inputs a runtime must feed: declared inputs without an initializer.
    pub fn runtime_inputs(&self) -> impl Iterator<Item = &ValueInfoProto> {
        self.inputs.iter().filter(|i| !self.constants.contains_key(i.name()))
    }

    /// Checks the invariants every pass must keep: unique tensor names, every input defined,
    /// graph outputs produced, edges in agreement with names, no cycle.
    pub fn check(&self) -> Result<()> {
        let mut defined: BTreeSet<&str> = BTreeSet::new();
        for i in self.runtime_inputs() {
            if !defined.insert(i.name()) {
                return Err(Error::Graph(format!("graph input '{}' is declared twice", i.name())));
            }
        }
        for name in self.constants.keys() {
            if !defined.insert(name) && !self.inputs.iter().any(|i| i.name() == name) {
                return Err(Error::Graph(format!("constant '{name}' is also a graph input")));
            }
        }
        for n in self.nodes.node_weights() {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if !defined.insert(o) {
                    return Err(Error::Graph(format!(
                        "tensor '{o}' of {} is defined more than once",
                        n.label()
                    )));
                }
            }
        }
        for n in self.nodes.node_weights() {
            if n.op_type.is_empty() {
                return Err(Error::Graph(format!("a node producing {:?} has no op type", n.outputs)));
            }
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                if !defined.contains(i.as_str()) {
                    return Err(Error::Graph(format!(
                        "{} reads '{i}', which nothing defines",
                        n.label()
                    )));
                }
            }
        }
        for o in &self.outputs {
            if !defined.contains(o.name()) {
                return Err(Error::Graph(format!(
                    "graph output '{}' is not produced by anything",
                    o.name()
                )));
            }
        }
        use petgraph::visit::{EdgeRef, IntoEdgeReferences};
        let wanted = self.edges_from_names()?;
        let expected: BTreeSet<(NodeIndex, NodeIndex, &Edge)> = wanted.iter().map(|(a, b, e)| (*a, *b, e)).collect();
        let actual: BTreeSet<(NodeIndex, NodeIndex, &Edge)> = (&self.nodes)
            .edge_references()
            .map(|e| (e.source(), e.target(), e.weight()))
            .collect();
        if expected != actual {
            return Err(Error::Graph(
                "edges are out of date with node inputs (call rebuild_edges)".into(),
            ));
        }
        self.topological_order()?;
        Ok(())
    }

    pub fn to_proto(&self) -> Result<GraphProto> {
        let mut g = self.header.clone();
        g.input = self.inputs.clone();
        g.output = self.outputs.clone();
        g.value_info = self
            .value_info
            .iter()
            .filter(|v| has_static_shape(v))
            .cloned()
            .collect();

        // Initializers: originals in their original order, then created ones by name.
        let mut initializers: Vec<(usize, &Constant)> = Vec::new();
        let mut created: Vec<&Constant> = Vec::new();
        let mut constant_nodes: Vec<(u64, NodeProto)> = Vec::new();
        for c in self.constants.values() {
            match &c.origin {
                ConstantOrigin::Initializer { order } => initializers.push((*order, c)),
                ConstantOrigin::Created => created.push(c),
                ConstantOrigin::ConstantNode { node, order, modified } => {
                    let mut node = node.clone();
                    if *modified {
                        let mut value = c.tensor.clone();
                        value.name = None;
                        node.attribute = vec![AttributeProto {
                            name: Some("value".into()),
                            r#type: Some(proto::attribute_proto::AttributeType::Tensor as i32),
                            t: Some(value),
                            ..Default::default()
                        }];
                    }
                    constant_nodes.push((*order, node));
                }
            }
        }
        initializers.sort_by_key(|(order, _)| *order);
        g.initializer = initializers
            .into_iter()
            .map(|(_, c)| c.tensor.clone())
            .chain(created.into_iter().map(|c| c.tensor.clone()))
            .collect();

        // Constant nodes have no inputs: merge them into the topological order by order key.
        constant_nodes.sort_by_key(|(order, _)| *order);
        let mut constant_nodes = constant_nodes.into_iter().peekable();
        let mut node_protos = Vec::with_capacity(self.nodes.node_count() + constant_nodes.len());
        for ix in self.topological_order()? {
            let n = &self.nodes[ix];
            while let Some((_, c)) = constant_nodes.next_if(|(order, _)| *order <= n.order) {
                node_protos.push(c);
            }
            let mut p = n.extra.clone();
            // Keep an absent field absent when a pass left its value alone (byte-exact round trip).
            if p.name.as_deref().unwrap_or("") != n.name {
                p.name = Some(n.name.clone());
            }
            if p.domain.as_deref().unwrap_or("") != n.domain {
                p.domain = Some(n.domain.clone());
            }
            if p.op_type.as_deref() != Some(n.op_type.as_str()) {
                p.op_type = Some(n.op_type.clone());
            }
            p.input = n.inputs.clone();
            p.output = n.outputs.clone();
            p.attribute = n.attributes.clone();
            node_protos.push(p);
        }
        node_protos.extend(constant_nodes.map(|(_, c)| c));
        g.node = node_protos;
        Ok(g)
    }
}

/// True when the value info is a tensor whose every dimension is a known non-negative number.
pub fn has_static_shape(v: &ValueInfoProto) -> bool {
    use proto::tensor_shape_proto::dimension::Value as Dim;
    use proto::type_proto::Value;
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Value::TensorType(t)) => match &t.shape {
            Some(s) => s
                .dim
                .iter()
                .all(|d| matches!(d.value, Some(Dim::DimValue(v)) if v >= 0)),
            None => false,
        },
        _ => false,
    }
}
