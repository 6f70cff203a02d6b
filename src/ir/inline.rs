//! Inlining the branch an `If` takes, and putting the model back together afterwards.
//!
//! Calibration, planning and verification see one flat graph; the written model keeps its
//! control flow. [`inline_if`] replaces an `If` of the top-level graph by the nodes and
//! constants of the branch it takes (names kept: ONNX names are unique across nested graphs,
//! and a clash is an error), plus one `Identity` per If output (`If output = Identity(branch
//! output)`), and records where everything came from. [`restore`] takes the flat graph after any
//! rewriting (Q/DQ nodes, changed weights, new biases) and puts every node and constant back in
//! the graph it came from; a node onnxq made goes to the innermost graph that all its readers see,
//! the `If` nodes come back with both branches, and the branches not taken are as they were.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use petgraph::stable_graph::StableGraph;

use crate::error::{Error, Result};
use crate::ir::{Constant, ConstantOrigin, Graph, Model, Node, ORDER_STEP};
use crate::proto::GraphProto;

/// Where a node or constant lives: the path of (If node key, branch attribute) from the top-level
/// graph; empty for the top level.
pub type Scope = Vec<(String, String)>;

/// A node's key: its first output name (unique), else its name (as the plan keys layers).
pub fn key(n: &Node) -> String {
    n.outputs
        .iter()
        .find(|o| !o.is_empty())
        .cloned()
        .unwrap_or_else(|| n.name.clone())
}

/// One `If` replaced by its branch.
#[derive(Clone, Debug)]
pub struct Folded {
    /// The If node as it was, both branches included.
    pub node: Node,
    /// The graph the If lives in.
    pub parent: Scope,
    /// The branch attribute taken (`then_branch` or `else_branch`).
    pub branch: String,
    /// The taken branch without its nodes and constants (name, outputs, value_info…), to rebuild it.
    body: Graph,
    /// Constants of enclosing graphs the branches read, as they were: a rewrite of the flat graph
    /// may drop a float weight only the untaken branch still reads.
    outer_reads: BTreeMap<String, (Scope, Constant)>,
}

impl Folded {
    /// The graph the taken branch's nodes came from.
    pub fn scope(&self) -> Scope {
        let mut s = self.parent.clone();
        s.push((key(&self.node), self.branch.clone()));
        s
    }
    /// Nodes of the branch not taken (compute and Constant nodes), which stay as they are.
    pub fn untaken_nodes(&self) -> usize {
        self.node
            .attributes
            .iter()
            .filter(|a| a.name() != self.branch)
            .flat_map(|a| a.g.iter())
            .map(|g| g.node.len())
            .sum()
    }
}

/// What inlining did, to undo it: every node and constant of the flat graph that came from a
/// branch, by key, with its graph.
#[derive(Clone, Debug, Default)]
pub struct Inlined {
    pub folded: Vec<Folded>,
    node_scope: BTreeMap<String, Scope>,
    constant_scope: BTreeMap<String, Scope>,
    /// The Identity nodes standing for If outputs, by key: index into `folded`.
    synthetic: BTreeMap<String, usize>,
    /// The default-domain opset when inlining started.
    opset: Option<i64>,
}

impl Inlined {
    /// Starts a record for `model`: everything now in it is top level.
    pub fn new(model: &Model) -> Inlined {
        Inlined {
            node_scope: model
                .graph
                .nodes
                .node_weights()
                .map(|n| (key(n), Scope::new()))
                .collect(),
            constant_scope: model
                .graph
                .constants
                .keys()
                .map(|c| (c.clone(), Scope::new()))
                .collect(),
            opset: model.opset(""),
            ..Default::default()
        }
    }
    /// For a node of the flat graph that stands for an If output (not in the written model):
    /// the graph of the branch whose output it passes on.
    pub fn synthetic_scope(&self, key: &str) -> Option<Scope> {
        self.synthetic.get(key).map(|&f| self.folded[f].scope())
    }
    /// The graph a node of the flat graph (by key) comes from; None for a node onnxq made.
    pub fn node_scope(&self, key: &str) -> Option<&Scope> {
        self.node_scope.get(key)
    }
    /// The graph a constant of the flat graph comes from; None for one onnxq made.
    pub fn constant_scope(&self, name: &str) -> Option<&Scope> {
        self.constant_scope.get(name)
    }
}

/// Replaces the top-level `If` whose key is `if_key` by its `then_branch` (`then = true`) or
/// `else_branch`, recording it in `record`.
pub fn inline_if(model: &mut Model, if_key: &str, then: bool, record: &mut Inlined) -> Result<()> {
    let g = &mut model.graph;
    let ix = g
        .nodes
        .node_indices()
        .find(|&ix| key(&g.nodes[ix]) == if_key && g.nodes[ix].op_type == "If")
        .ok_or_else(|| Error::internal(format!("no If '{if_key}' to inline")))?;
    let branch = if then { "then_branch" } else { "else_branch" };
    let node = g.nodes[ix].clone();
    let body_proto = node
        .attribute(branch)
        .and_then(|a| a.g.clone())
        .ok_or_else(|| Error::Graph(format!("{} has no {branch}", node.label())))?;
    let mut body = Graph::from_proto(body_proto)?;
    if !body.inputs.is_empty() || body.outputs.len() != node.outputs.len() {
        return Err(Error::Graph(format!(
            "{}: its {branch} has {} inputs and {} outputs, the If {} outputs",
            node.label(),
            body.inputs.len(),
            body.outputs.len(),
            node.outputs.len()
        )));
    }
    let parent = record
        .node_scope
        .remove(if_key)
        .ok_or_else(|| Error::internal(format!("If '{if_key}' has no recorded graph")))?;
    // Names the enclosing graphs define, to refuse a clash.
    let mut defined: BTreeSet<String> = g.constants.keys().cloned().collect();
    defined.extend(g.inputs.iter().map(|i| i.name().to_string()));
    defined.extend(
        g.nodes
            .node_weights()
            .flat_map(|n| n.outputs.iter().filter(|o| !o.is_empty()).cloned()),
    );
    let mut outer_reads = BTreeMap::new();
    for name in &node.implicit_inputs {
        if let Some(c) = g.constants.get(name) {
            let scope = record.constant_scope.get(name).cloned().unwrap_or_default();
            outer_reads.insert(name.clone(), (scope, c.clone()));
        }
    }
    let mut scope = parent.clone();
    scope.push((if_key.to_string(), branch.to_string()));

    // The branch's nodes go between the If and the node after it, in their own order.
    let start = node.order;
    let next = g
        .nodes
        .node_weights()
        .map(|n| n.order)
        .filter(|&o| o > start)
        .min()
        .unwrap_or(start + ORDER_STEP);
    let mut body_nodes: Vec<Node> = body.nodes.node_weights().cloned().collect();
    body.nodes = StableGraph::new();
    body_nodes.sort_by_key(|n| n.order);
    let slots = (body_nodes.len() + body.constants.len() + 2) as u64;
    let step = ((next - start) / slots).max(1);
    let place = |order: u64| start + (order / ORDER_STEP).min(slots - 2) * step;

    for (name, mut c) in std::mem::take(&mut body.constants) {
        if !defined.insert(name.clone()) {
            return Err(Error::Graph(format!(
                "'{name}' of the {branch} of {} is also defined outside it (names must be unique across nested graphs)",
                node.label()
            )));
        }
        if let ConstantOrigin::ConstantNode { order, .. } = &mut c.origin {
            *order = place(*order);
        }
        record.constant_scope.insert(name.clone(), scope.clone());
        g.constants.insert(name, c);
    }
    for mut n in body_nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if !defined.insert(o.clone()) {
                return Err(Error::Graph(format!(
                    "'{o}' of the {branch} of {} is also defined outside it (names must be unique across nested graphs)",
                    node.label()
                )));
            }
        }
        n.order = place(n.order);
        record.node_scope.insert(key(&n), scope.clone());
        g.nodes.add_node(n);
    }
    g.nodes.remove_node(ix);
    let folded = record.folded.len();
    for (out, inner) in node.outputs.iter().zip(&body.outputs) {
        let id = Node::new(
            &format!("{out}::branch_output"),
            "Identity",
            vec![inner.name().to_string()],
            out,
            start + (slots - 1) * step,
        );
        record.synthetic.insert(out.clone(), folded);
        g.nodes.add_node(id);
    }
    record.folded.push(Folded {
        node,
        parent,
        branch: branch.to_string(),
        body,
        outer_reads,
    });
    g.rebuild_edges()
}

/// Every common leading element of two scopes.
fn common(a: &Scope, b: &Scope) -> Scope {
    a.iter()
        .zip(b)
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.clone())
        .collect()
}

/// The model with the control flow `record` inlined put back (module docs). `flat` is the
/// inlined model after any rewriting; the result keeps `flat`'s header (opset, metadata).
pub fn restore(flat: &Model, record: &Inlined) -> Result<Model> {
    if record.folded.is_empty() {
        return Ok(flat.clone());
    }
    if flat.opset("") != record.opset {
        return Err(Error::Graph(format!(
            "the default-domain opset was raised from {:?} to {:?} while the model's If branches were inlined; the branches not taken would keep the old opset's ops (not supported: convert the model to opset 13 or later first)",
            record.opset,
            flat.opset("")
        )));
    }
    let g = &flat.graph;
    let order = g.topological_order()?;
    // Where each tensor is read from: the graphs of its readers.
    let mut readers: HashMap<&str, Vec<Scope>> = HashMap::new();
    for o in &g.outputs {
        readers.entry(o.name()).or_default().push(Scope::new());
    }
    let mut placed: BTreeMap<Scope, Vec<Node>> = BTreeMap::new();
    for &ix in order.iter().rev() {
        let n = &g.nodes[ix];
        let k = key(n);
        let scope = if let Some(&f) = record.synthetic.get(&k) {
            // Not written back: it stands for the branch's output, which the branch must still
            // produce (what onnxq put between them, e.g. Q/DQ of a pass-through, goes).
            let f = &record.folded[f];
            for i in n
                .inputs
                .iter()
                .filter(|i| f.body.outputs.iter().any(|o| o.name() == i.as_str()))
            {
                readers.entry(i.as_str()).or_default().push(f.scope());
            }
            continue;
        } else if let Some(s) = record.node_scope.get(&k) {
            s.clone()
        } else {
            // Made by onnxq: in the innermost graph every reader sees; dropped if nothing reads it.
            let mut seen = n.outputs.iter().filter_map(|o| readers.get(o.as_str())).flatten();
            let Some(first) = seen.next() else { continue };
            seen.fold(first.clone(), |acc, s| common(&acc, s))
        };
        for i in n.inputs.iter().chain(&n.implicit_inputs).filter(|i| !i.is_empty()) {
            readers.entry(i.as_str()).or_default().push(scope.clone());
        }
        placed.entry(scope).or_default().push(n.clone());
    }
    let mut constants: BTreeMap<Scope, BTreeMap<String, Constant>> = BTreeMap::new();
    for (name, c) in &g.constants {
        let scope = match record.constant_scope.get(name) {
            Some(s) => s.clone(),
            None => {
                let mut seen = readers.get(name.as_str()).into_iter().flatten();
                let Some(first) = seen.next() else { continue };
                seen.fold(first.clone(), |acc, s| common(&acc, s))
            }
        };
        constants.entry(scope).or_default().insert(name.clone(), c.clone());
    }
    // Innermost first: a branch is rebuilt before the If that holds it goes into its own graph.
    for f in record.folded.iter().rev() {
        let scope = f.scope();
        for (name, (at, c)) in &f.outer_reads {
            let have = constants.get(at).is_some_and(|m| m.contains_key(name))
                || placed
                    .get(at)
                    .is_some_and(|ns| ns.iter().any(|n| n.outputs.contains(name)));
            if !have {
                constants.entry(at.clone()).or_default().insert(name.clone(), c.clone());
            }
        }
        let mut body = f.body.clone();
        body.constants = constants.remove(&scope).unwrap_or_default();
        body.nodes = StableGraph::new();
        for n in placed.remove(&scope).unwrap_or_default() {
            body.nodes.add_node(n);
        }
        body.rebuild_edges()?;
        let proto: GraphProto = body.to_proto()?;
        let mut node = f.node.clone();
        let attr = node
            .attributes
            .iter_mut()
            .find(|a| a.name() == f.branch)
            .ok_or_else(|| Error::internal(format!("If '{}' lost its {}", key(&f.node), f.branch)))?;
        attr.g = Some(proto);
        node.implicit_inputs = crate::ir::subgraph_reads(&node.attributes);
        placed.entry(f.parent.clone()).or_default().push(node);
    }
    if let Some(scope) = placed.keys().chain(constants.keys()).find(|s| !s.is_empty()) {
        return Err(Error::internal(format!(
            "nodes placed in a graph that is not a folded branch: {scope:?}"
        )));
    }
    let mut model = flat.clone();
    model.graph.constants = constants.remove(&Scope::new()).unwrap_or_default();
    model.graph.nodes = StableGraph::new();
    for n in placed.remove(&Scope::new()).unwrap_or_default() {
        model.graph.nodes.add_node(n);
    }
    model.graph.rebuild_edges()?;
    model.graph.check()?;
    Ok(model)
}
