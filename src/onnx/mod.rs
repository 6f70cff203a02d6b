//! Reading and writing ONNX files: protobuf decoding with clear errors, external data,
//! opset and operator validation, atomic deterministic output.
//!
//! External data stays on disk: a top-level initializer of 1 KiB or more stored externally is
//! checked when the model is read (location, length, range of the file) but not read; the IR
//! keeps where it is (`ir::tensor::on_disk`) and reads it when a pass asks for its values.
//! Writing streams: the data file is copied tensor by tensor (from memory or from the input's
//! data file) and the model is encoded straight into its file, never into one buffer.

pub mod opset;
pub mod schemas;

use std::path::{Component, Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};
use crate::ir::tensor::{byte_size, dtype_name, on_disk, raw_bytes, read_on_disk};
use crate::ir::Model;
use crate::proto::tensor_proto::DataLocation;
use crate::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};

/// Protobuf cannot serialise a message of 2 GiB or more.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// Reads a model file, resolving external data relative to its directory, and builds the IR.
/// Rejects what onnxq cannot handle with an error naming the file.
pub fn load_model(path: &Path) -> Result<Model> {
    let bytes = read_model_bytes(path)?;
    let mut proto = decode_model(path, &bytes)?;
    drop(bytes);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Some(graph) = proto.graph.as_mut() {
        resolve_external_graph(graph, &dir, path)?;
    }
    validate(path, &proto)?;
    let model = Model::from_proto(proto).map_err(|e| Error::model(path, e.to_string()))?;
    // Dangling inputs, duplicate names, cycles: reject at the door, not deep inside a pass.
    model.graph.check().map_err(|e| Error::model(path, e.to_string()))?;
    Ok(model)
}

fn read_model_bytes(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::model(path, "is a directory, not an ONNX model file"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::model(path, "is empty, not an ONNX model"));
    }
    Ok(bytes)
}

/// Decodes a ModelProto; a file that decodes to no graph is not a model either (protobuf
/// decodes many random byte strings "successfully").
pub fn decode_model(path: &Path, bytes: &[u8]) -> Result<ModelProto> {
    let proto = ModelProto::decode(bytes).map_err(|e| {
        Error::model(
            path,
            format!("not a valid ONNX protobuf (truncated or not a model?): {e}"),
        )
    })?;
    let graph = proto.graph.as_ref();
    if graph.is_none() || proto.ir_version.is_none() {
        return Err(Error::model(
            path,
            "not an ONNX model: no graph or no IR version (truncated, or another file type?)",
        ));
    }
    Ok(proto)
}

fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

fn visit_graph_tensors(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        if let Some(v) = s.values.as_mut() {
            f(v)?;
        }
        if let Some(i) = s.indices.as_mut() {
            f(i)?;
        }
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            if let Some(t) = a.t.as_mut() {
                f(t)?;
            }
            for t in &mut a.tensors {
                f(t)?;
            }
            if let Some(sg) = a.g.as_mut() {
                visit_graph_tensors(sg, f)?;
            }
            for sg in &mut a.graphs {
                visit_graph_tensors(sg, f)?;
            }
        }
    }
    Ok(())
}

/// External tensors of at least this many bytes among the top-level initializers stay on disk.
pub const ON_DISK_BYTES: u64 = 1024;

/// Checks every externally stored tensor; top-level initializers of `ON_DISK_BYTES` and more
/// stay on disk (their location made absolute, see `ir::tensor::on_disk`), the others (small
/// ones, in subgraphs, `Constant` values, sparse tensors) are read into `raw_data`.
fn resolve_external_graph(g: &mut GraphProto, dir: &Path, model_path: &Path) -> Result<()> {
    let mut initializers = std::mem::take(&mut g.initializer);
    let resolved = initializers
        .iter_mut()
        .try_for_each(|t| resolve_external(t, dir, model_path, true))
        .and_then(|()| visit_graph_tensors(g, &mut |t| resolve_external(t, dir, model_path, false)));
    g.initializer = initializers;
    resolved
}

/// One tensor of `resolve_external_graph`: nothing to do unless it is external.
fn resolve_external(t: &mut TensorProto, dir: &Path, model_path: &Path, may_stay_on_disk: bool) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    {
        if !is_external(t) {
            return Ok(());
        }
        let field = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key() == key)
                .map(|e| e.value().to_string())
        };
        let name = t.name().to_string();
        let location = field("location")
            .ok_or_else(|| Error::model(model_path, format!("tensor '{name}': external data without a location")))?;
        let rel = Path::new(&location);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(Error::model(
                model_path,
                format!("tensor '{name}': external data location '{location}' must be relative and inside the model's folder"),
            ));
        }
        let number = |key: &str| -> Result<Option<u64>> {
            field(key)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        Error::model(
                            model_path,
                            format!("tensor '{name}': external {key} '{v}' is not a number"),
                        )
                    })
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let expected = byte_size(t);
        let length = number("length")?.unwrap_or(expected);
        if length != expected {
            return Err(Error::model(
                model_path,
                format!(
                    "tensor '{name}': external length {length} but dims {:?} of {} need {expected} bytes",
                    t.dims,
                    dtype_name(t.data_type())
                ),
            ));
        }
        let data_path = dir.join(rel);
        let mut file = std::fs::File::open(&data_path).map_err(|e| Error::io(&data_path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&data_path, e))?.len();
        if offset.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(Error::data(
                &data_path,
                format!(
                    "tensor '{name}': bytes {offset}..{} are past the end of the file ({file_len} bytes)",
                    offset.saturating_add(length)
                ),
            ));
        }
        if may_stay_on_disk && length >= ON_DISK_BYTES && t.raw_data.is_none() {
            let absolute = data_path.canonicalize().map_err(|e| Error::io(&data_path, e))?;
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.into()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", absolute.to_string_lossy().into_owned()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ];
            if crate::ir::tensor::on_disk(t).is_none() {
                return Err(Error::model(
                    model_path,
                    format!(
                        "tensor '{name}': external data path {} is not valid UTF-8",
                        absolute.display()
                    ),
                ));
            }
            return Ok(());
        }
        let mut buf = vec![0u8; length as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| Error::io(&data_path, e))?;
        t.raw_data = Some(buf.into());
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    }
}

/// Rejects models onnxq cannot handle: opsets it does not know, default-domain ops that do not
/// exist at the imported opset, nodes of a domain the model does not import.
pub fn validate(path: &Path, proto: &ModelProto) -> Result<()> {
    let mut seen_domains = std::collections::BTreeSet::new();
    for o in &proto.opset_import {
        let domain = o.domain();
        if !seen_domains.insert(domain) {
            return Err(Error::model(path, format!("opset domain '{domain}' is imported twice")));
        }
        let max = match domain {
            "" | "ai.onnx" => Some(schemas::MAX_ONNX_OPSET),
            "ai.onnx.ml" => Some(schemas::MAX_ONNX_ML_OPSET),
            _ => None,
        };
        if let Some(max) = max {
            if o.version() < 1 || o.version() > max {
                let shown = if domain.is_empty() { "ai.onnx" } else { domain };
                return Err(Error::model(
                    path,
                    format!(
                        "opset {shown} {} is not supported: onnxq knows opsets 1 to {max}",
                        o.version()
                    ),
                ));
            }
        }
    }
    let function_domains: std::collections::BTreeSet<(&str, &str)> =
        proto.functions.iter().map(|f| (f.domain(), f.name())).collect();
    let graph = proto.graph.as_ref().expect("checked by decode_model");
    let imported = |domain: &str| -> Option<i64> {
        let is_default = |d: &str| d.is_empty() || d == "ai.onnx";
        proto
            .opset_import
            .iter()
            .find(|o| o.domain() == domain || (is_default(domain) && is_default(o.domain())))
            .map(|o| o.version())
    };
    for n in &graph.node {
        let label = if n.name().is_empty() {
            format!("{} node -> {:?}", n.op_type(), n.output)
        } else {
            format!("node '{}'", n.name())
        };
        let domain = n.domain();
        let Some(version) = imported(domain) else {
            return Err(Error::model(
                path,
                format!("{label} uses domain '{domain}', which the model does not import"),
            ));
        };
        if function_domains.contains(&(domain, n.op_type())) {
            continue;
        }
        if let Some(since) = schema_since(domain, n.op_type()) {
            if !since.iter().any(|&s| s <= version) {
                return Err(Error::model(
                    path,
                    format!(
                        "{label}: {} exists from opset {} on, the model imports opset {version}",
                        n.op_type(),
                        since[0]
                    ),
                ));
            }
        } else if matches!(domain, "" | "ai.onnx" | "ai.onnx.ml") {
            return Err(Error::model(
                path,
                format!(
                    "{label}: unknown op '{}' in ONNX domain '{}'",
                    n.op_type(),
                    if domain.is_empty() { "ai.onnx" } else { domain }
                ),
            ));
        }
    }
    Ok(())
}

/// Opset versions that (re)defined an op, or None if the op is not an ONNX op.
pub fn schema_since(domain: &str, op_type: &str) -> Option<&'static [i64]> {
    let domain = if domain == "ai.onnx" { "" } else { domain };
    schemas::SCHEMAS
        .binary_search_by(|(d, o, _)| (*d, *o).cmp(&(domain, op_type)))
        .ok()
        .map(|i| schemas::SCHEMAS[i].2)
}

/// How to write the weights.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Store initializers of at least this many bytes in `<model file name>.data` beside the
    /// model. None: inline, unless the model would exceed protobuf's 2 GiB limit, in which
    /// case tensors of 1 KiB and more go external.
    pub external_data_threshold: Option<u64>,
}

/// Serialises the model, every tensor inline; deterministic for a given IR.
pub fn model_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut proto = model.to_proto()?;
    read_into_memory(&mut proto)?;
    Ok(proto.encode_to_vec())
}

/// Reads every tensor still on disk into `raw_data` (what writing a model inline needs).
fn read_into_memory(proto: &mut ModelProto) -> Result<()> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    visit_graph_tensors(graph, &mut |t| {
        let Some((path, _, _)) = on_disk(t) else { return Ok(()) };
        let path = path.to_path_buf();
        let mut buf = Vec::new();
        read_on_disk(t, &mut buf).map_err(|e| Error::io(&path, e))?;
        t.raw_data = Some(buf.into());
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    })
}

/// Bytes the tensors still on disk would add to the encoding when inlined (their values and
/// a field header each, a little more than the external-data entries they replace).
fn on_disk_bytes(proto: &ModelProto) -> u64 {
    fn graph_bytes(g: &GraphProto) -> u64 {
        let tensor = |t: &TensorProto| on_disk(t).map_or(0, |(_, _, length)| length + 16);
        let mut total: u64 = g.initializer.iter().map(tensor).sum();
        for a in g.node.iter().flat_map(|n| &n.attribute) {
            total += a.t.iter().chain(&a.tensors).map(tensor).sum::<u64>();
            total += a.g.iter().chain(&a.graphs).map(graph_bytes).sum::<u64>();
        }
        total
    }
    proto.graph.as_ref().map_or(0, graph_bytes)
}

/// Writes the model atomically (temporary file in the same folder, then rename), with its
/// external data file when needed. Never leaves a half-written output.
pub fn save_model(model: &Model, path: &Path, options: &SaveOptions) -> Result<()> {
    let mut proto = model.to_proto()?;
    let threshold = match options.external_data_threshold {
        Some(t) => Some(t),
        None if proto.encoded_len() as u64 + on_disk_bytes(&proto) > PROTOBUF_LIMIT => Some(1024),
        None => None,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: output path has no file name", path.display())))?
        .to_string_lossy()
        .to_string();
    let data_name = format!("{file_name}.data");
    let data = threshold.map(|threshold| externalise(&mut proto, &data_name, threshold));
    read_into_memory(&mut proto)?;
    if proto.encoded_len() as u64 > PROTOBUF_LIMIT {
        return Err(Error::model(
            path,
            "the model exceeds protobuf's 2 GiB limit even with its weights stored externally",
        ));
    }
    if let Some(data) = data {
        write_atomic_with(&path.with_file_name(&data_name), |out| data.write(out))?;
    }
    write_atomic_with(path, |out| {
        let mut buf = EncodeBuf::new(out);
        proto.encode_raw(&mut buf);
        buf.finish()
    })
}

/// The external data file `externalise` laid out: each tensor's bytes, where they are now,
/// in file order, each after `padding` zero bytes.
struct ExternalData {
    parts: Vec<(usize, DataPart)>,
}

enum DataPart {
    Memory(bytes::Bytes),
    OnDisk(Box<TensorProto>),
}

impl ExternalData {
    fn write(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        for (padding, part) in &self.parts {
            out.write_all(&[0u8; 64][..*padding])?;
            match part {
                DataPart::Memory(bytes) => out.write_all(bytes)?,
                DataPart::OnDisk(t) => {
                    let (path, offset, length) = on_disk(t)
                        .ok_or_else(|| std::io::Error::other(format!("tensor '{}' is not on disk", t.name())))?;
                    let mut file = std::fs::File::open(path)?;
                    file.seek(SeekFrom::Start(offset))?;
                    let copied = std::io::copy(&mut file.take(length), out)?;
                    if copied != length {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("{}: the file is shorter than when it was read", path.display()),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Points the large top-level initializers at one data file, each 64-byte aligned (what
/// memory-mapping loaders expect), and says where their bytes come from.
fn externalise(proto: &mut ModelProto, location: &str, threshold: u64) -> ExternalData {
    let mut parts = Vec::new();
    let Some(graph) = proto.graph.as_mut() else {
        return ExternalData { parts };
    };
    let mut end = 0usize;
    for t in &mut graph.initializer {
        let part = match (&t.raw_data, on_disk(t)) {
            (Some(raw), _) => DataPart::Memory(raw.clone()),
            (None, Some(_)) => DataPart::OnDisk(Box::new(t.clone())),
            (None, None) => match raw_bytes(t) {
                Some(bytes) => DataPart::Memory(bytes.into_owned().into()),
                None => continue,
            },
        };
        let length = match &part {
            DataPart::Memory(bytes) => bytes.len(),
            DataPart::OnDisk(t) => on_disk(t).map_or(0, |(_, _, length)| length as usize),
        };
        if (length as u64) < threshold {
            continue;
        }
        let offset = end.next_multiple_of(64);
        parts.push((offset - end, part));
        end = offset + length;
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        t.raw_data = None;
        t.float_data.clear();
        t.int32_data.clear();
        t.int64_data.clear();
        t.double_data.clear();
        t.uint64_data.clear();
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", length.to_string()),
        ];
    }
    ExternalData { parts }
}

/// A `BufMut` that writes what prost encodes into a file through a 1 MiB buffer, so a model is
/// never encoded into one buffer of its whole size. The first write error is kept and returned
/// by `finish`; later writes are dropped.
struct EncodeBuf<'a> {
    out: &'a mut dyn std::io::Write,
    buf: Vec<u8>,
    error: Option<std::io::Error>,
}

impl<'a> EncodeBuf<'a> {
    const CAPACITY: usize = 1 << 20;

    fn new(out: &'a mut dyn std::io::Write) -> Self {
        EncodeBuf {
            out,
            buf: Vec::with_capacity(Self::CAPACITY),
            error: None,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(bytes) {
                self.error = Some(e);
            }
        }
    }

    fn flush_buf(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.write(&buf);
        self.buf = buf;
        self.buf.clear();
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.flush_buf();
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

// SAFETY: `chunk_mut` hands out the buffer's spare capacity, never empty (the buffer is flushed
// when full), and `advance_mut` only grows the length over bytes the caller has written.
unsafe impl bytes::BufMut for EncodeBuf<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advanced past the chunk");
        // SAFETY: the caller initialised `cnt` bytes of the chunk `chunk_mut` returned.
        unsafe { self.buf.set_len(len) };
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        bytes::buf::UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, src: &[u8]) {
        if self.buf.len() + src.len() > self.buf.capacity() {
            self.flush_buf();
        }
        if src.len() >= self.buf.capacity() {
            self.write(src);
        } else {
            self.buf.extend_from_slice(src);
        }
    }
}

/// Writes a file via a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |out| out.write_all(bytes))
}

/// Writes a file via a temporary file in the same directory and a rename, its contents written
/// by `write` (through a buffer).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            path.file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default()
        ))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    let tmp_path = tmp.path().to_path_buf();
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        write(&mut out)
            .and_then(|_| out.flush())
            .map_err(|e| Error::io(&tmp_path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    // Temporary files are private (0600); an output keeps the mode of the file it replaces,
    // or gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o644);
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_lookup_knows_ops_and_versions() {
        assert!(schema_since("", "Conv").unwrap().contains(&11));
        assert_eq!(schema_since("", "LayerNormalization").unwrap()[0], 17);
        assert!(schema_since("", "NoSuchOp").is_none());
        assert!(schema_since("ai.onnx.ml", "TreeEnsembleClassifier").is_some());
    }
}
