//! Input data in the shared convention: a `.npz` whose arrays are named after model inputs,
//! each with a leading *sample* axis (sample `i` is `arr[i]`, which carries the model's own batch
//! dimension); arrays whose names start with `_` are labels or metadata and are ignored. A `.npy`
//! holds one array and feeds a single-input model.

use std::path::{Path, PathBuf};

use tract_onnx::prelude::{DatumType, IntoTValue, TValue, Tensor};

use crate::error::{Error, Result};
use crate::ir::tensor::dtype_name;
use crate::ir::Graph;
use crate::proto::tensor_proto::DataType;

/// One array of a data file: all samples of one model input.
#[derive(Debug)]
pub struct DataArray {
    /// The model input it feeds ("" for a bare .npy).
    pub name: String,
    pub dtype: DatumType,
    /// `[samples, ...input shape]`.
    pub shape: Vec<usize>,
    values: Values,
}

/// Where an array's values are. An array stored uncompressed in little-endian order (what
/// `np.save` and `np.savez` write) is read one sample at a time from its file, so data does not
/// take memory by the number of samples; a compressed one is read whole.
#[derive(Debug)]
enum Values {
    Memory(Tensor),
    File { path: PathBuf, offset: u64 },
}

impl DataArray {
    /// An array held in memory, `[samples, ...]`.
    pub fn new(name: impl Into<String>, tensor: Tensor) -> DataArray {
        DataArray {
            name: name.into(),
            dtype: tensor.datum_type(),
            shape: tensor.shape().to_vec(),
            values: Values::Memory(tensor),
        }
    }

    /// Sample `i`: the array's `[i]`.
    pub fn sample(&self, i: usize) -> Result<Tensor> {
        let sample_shape = &self.shape[1..];
        match &self.values {
            Values::Memory(t) => t
                .slice(0, i, i + 1)
                .and_then(|t| t.into_shape(sample_shape))
                .map_err(crate::error::tract_error),
            Values::File { path, offset } => {
                use std::io::{Read, Seek, SeekFrom};
                let size = sample_shape.iter().product::<usize>() * self.dtype.size_of();
                let mut bytes = vec![0u8; size];
                let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                file.seek(SeekFrom::Start(offset + (i * size) as u64))
                    .and_then(|_| file.read_exact(&mut bytes))
                    .map_err(|e| {
                        Error::data(
                            path,
                            format!("array '{}', sample {i}: cannot read values: {e}", self.name),
                        )
                    })?;
                from_le_bytes(self.dtype, sample_shape, &bytes)
                    .ok_or_else(|| Error::internal(format!("{:?} arrays are read from memory", self.dtype)))
            }
        }
    }
}

/// A tensor from little-endian bytes (numeric types; None for others).
fn from_le_bytes(dt: DatumType, shape: &[usize], bytes: &[u8]) -> Option<Tensor> {
    macro_rules! decode {
        ($t:ty) => {{
            let n = std::mem::size_of::<$t>();
            let v: Vec<$t> = bytes
                .chunks_exact(n)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunks of the type's size")))
                .collect();
            Tensor::from_shape::<$t>(shape, &v).ok()
        }};
    }
    match dt {
        DatumType::F32 => decode!(f32),
        DatumType::F64 => decode!(f64),
        DatumType::I64 => decode!(i64),
        DatumType::I32 => decode!(i32),
        DatumType::I16 => decode!(i16),
        DatumType::I8 => decode!(i8),
        DatumType::U8 => decode!(u8),
        DatumType::U16 => decode!(u16),
        DatumType::U32 => decode!(u32),
        DatumType::U64 => decode!(u64),
        _ => None,
    }
}

/// The numeric types read in place.
fn numeric_datum(ts: &npyz::TypeStr) -> Option<DatumType> {
    use npyz::TypeChar::{Float, Int, Uint};
    Some(match (ts.type_char(), ts.size_field()) {
        (Float, 4) => DatumType::F32,
        (Float, 8) => DatumType::F64,
        (Int, 1) => DatumType::I8,
        (Int, 2) => DatumType::I16,
        (Int, 4) => DatumType::I32,
        (Int, 8) => DatumType::I64,
        (Uint, 1) => DatumType::U8,
        (Uint, 2) => DatumType::U16,
        (Uint, 4) => DatumType::U32,
        (Uint, 8) => DatumType::U64,
        _ => return None,
    })
}

/// Where the data of entry `name` of a `.npz` starts in the file, when it is stored (not
/// compressed).
fn stored_start(path: &Path, name: &str) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    let mut zip = npyz::zip::ZipArchive::new(file).ok()?;
    let entry = zip.by_name(&format!("{name}.npy")).ok()?;
    (entry.compression() == npyz::zip::CompressionMethod::Stored).then(|| entry.data_start())
}

/// An array read in place when it can be ([`values_offset`]), else read whole.
fn array_of<R: std::io::Read>(
    path: &Path,
    name: String,
    npy: npyz::NpyFile<R>,
    start: Option<u64>,
) -> Result<DataArray> {
    let in_place = start.and_then(|start| values_offset(path, start, npy.header()));
    match (in_place, npy.dtype()) {
        (Some(offset), npyz::DType::Plain(ts)) => Ok(DataArray {
            dtype: numeric_datum(&ts).ok_or_else(|| Error::internal("an array read in place is numeric"))?,
            shape: npy.shape().iter().map(|&d| d as usize).collect(),
            values: Values::File {
                path: path.to_path_buf(),
                offset,
            },
            name,
        }),
        _ => {
            let tensor = read_npy(path, &name, npy)?;
            Ok(DataArray::new(name, tensor))
        }
    }
}

/// Where the values of a `.npy` start in `file`, when they can be read in place: stored (not
/// compressed) at `start`, C order, little-endian numeric dtype. None otherwise.
fn values_offset(file: &Path, start: u64, npy_header: &npyz::NpyHeader) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    if npy_header.order() == npyz::Order::Fortran {
        return None;
    }
    let npyz::DType::Plain(ts) = npy_header.dtype() else {
        return None;
    };
    let little = match ts.endianness() {
        npyz::Endianness::Little => true,
        npyz::Endianness::Irrelevant => ts.size_field() == 1,
        npyz::Endianness::Big => false,
    };
    if !little || numeric_datum(&ts).is_none() {
        return None;
    }
    // The .npy preamble: magic (6), version (2), header length (2 bytes in v1, 4 after), header.
    let mut f = std::fs::File::open(file).ok()?;
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut pre = [0u8; 12];
    f.read_exact(&mut pre).ok()?;
    if &pre[..6] != b"\x93NUMPY" {
        return None;
    }
    let header = match pre[6] {
        1 => 10 + u16::from_le_bytes([pre[8], pre[9]]) as u64,
        2 | 3 => 12 + u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as u64,
        _ => return None,
    };
    Some(start + header)
}

#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub arrays: Vec<DataArray>,
}

/// What a model input accepts: dtype and dims (None where the model leaves a dim free).
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    pub elem_type: i32,
    pub dims: Option<Vec<Option<u64>>>,
}

impl InputSpec {
    pub fn of_graph(graph: &Graph) -> Vec<InputSpec> {
        use crate::proto::tensor_shape_proto::dimension::Value as Dim;
        use crate::proto::type_proto::Value;
        graph
            .runtime_inputs()
            .map(|v| {
                let tt = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                    Some(Value::TensorType(tt)) => Some(tt),
                    _ => None,
                };
                let dims = tt.and_then(|tt| tt.shape.as_ref()).map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(Dim::DimValue(v)) if v >= 0 => Some(v as u64),
                            _ => None,
                        })
                        .collect()
                });
                InputSpec {
                    name: v.name().to_string(),
                    elem_type: tt.map(|t| t.elem_type()).unwrap_or(0),
                    dims,
                }
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        let dims = match &self.dims {
            None => "?".to_string(),
            Some(d) => d
                .iter()
                .map(|d| d.map(|v| v.to_string()).unwrap_or_else(|| "?".into()))
                .collect::<Vec<_>>()
                .join(","),
        };
        format!("{}[{dims}]", dtype_name(self.elem_type))
    }
}

fn onnx_type_of(dt: DatumType) -> i32 {
    (match dt {
        DatumType::F32 => DataType::Float,
        DatumType::F64 => DataType::Double,
        DatumType::F16 => DataType::Float16,
        DatumType::I64 => DataType::Int64,
        DatumType::I32 => DataType::Int32,
        DatumType::I16 => DataType::Int16,
        DatumType::I8 => DataType::Int8,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::Bool => DataType::Bool,
        _ => DataType::Undefined,
    }) as i32
}

fn read_npy<R: std::io::Read>(path: &Path, name: &str, npy: npyz::NpyFile<R>) -> Result<Tensor> {
    let bad = |m: String| Error::data(path, format!("array '{name}': {m}"));
    if npy.order() == npyz::Order::Fortran {
        return Err(bad(
            "is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)".into(),
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        return Err(bad("structured arrays are not model inputs".into()));
    };
    let type_str = ts.to_string();
    let code = type_str.trim_start_matches(['<', '>', '|', '=']);
    let io = |e: std::io::Error| bad(format!("cannot read values: {e}"));
    macro_rules! read {
        ($t:ty) => {
            Tensor::from_shape::<$t>(&shape, &npy.into_vec::<$t>().map_err(io)?).map_err(|e| bad(e.to_string()))?
        };
    }
    Ok(match code {
        "f4" => read!(f32),
        "f8" => read!(f64),
        "i8" => read!(i64),
        "i4" => read!(i32),
        "i2" => read!(i16),
        "i1" => read!(i8),
        "u1" => read!(u8),
        "u2" => read!(u16),
        "u4" => read!(u32),
        "u8" => read!(u64),
        "b1" => read!(bool),
        other => {
            return Err(bad(format!(
                "dtype '{other}' is not supported (use float32, float64, int*, uint* or bool)"
            )))
        }
    })
}

impl Dataset {
    /// Reads every model-input array of a `.npz` or the one array of a `.npy`.
    pub fn load(path: &Path) -> Result<Dataset> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::data(path, "is a directory; expected a .npz or .npy file"));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let arrays = match ext.as_str() {
            "npz" => {
                let mut archive = npyz::npz::NpzArchive::open(path)
                    .map_err(|e| Error::data(path, format!("not a readable .npz archive: {e}")))?;
                let mut names: Vec<String> = archive
                    .array_names()
                    .filter(|n| !n.starts_with('_'))
                    .map(String::from)
                    .collect();
                names.sort();
                let mut arrays = Vec::new();
                for name in names {
                    let npy = archive
                        .by_name(&name)
                        .map_err(|e| Error::data(path, format!("array '{name}': {e}")))?
                        .ok_or_else(|| Error::data(path, format!("array '{name}' vanished from the archive")))?;
                    let start = stored_start(path, &name);
                    arrays.push(array_of(path, name, npy, start)?);
                }
                arrays
            }
            "npy" => {
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
                    .map_err(|e| Error::data(path, format!("not a readable .npy file: {e}")))?;
                vec![array_of(path, String::new(), npy, Some(0))?]
            }
            _ => return Err(Error::data(path, "unknown data format: expected a .npz or .npy file")),
        };
        if arrays.is_empty() {
            return Err(Error::data(
                path,
                "holds no model-input arrays (names starting with '_' are ignored)",
            ));
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            arrays,
        })
    }

    /// Matches the arrays to the model's inputs, checking names, dtypes, ranks, fixed dims and
    /// sample counts. Returns the arrays in model-input order.
    pub fn bind(&self, inputs: &[InputSpec]) -> Result<BoundData<'_>> {
        let err = |m: String| Error::data(&self.path, m);
        let available = || {
            self.arrays
                .iter()
                .map(|a| format!("'{}'", a.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut bound = Vec::new();
        for spec in inputs {
            let array = if self.arrays.len() == 1 && self.arrays[0].name.is_empty() && inputs.len() == 1 {
                &self.arrays[0]
            } else {
                self.arrays.iter().find(|a| a.name == spec.name).ok_or_else(|| {
                    err(format!(
                        "no array for model input '{}' (the file has {}); arrays must be named after model inputs",
                        spec.name,
                        available()
                    ))
                })?
            };
            let dt = array.dtype;
            if onnx_type_of(dt) != spec.elem_type {
                return Err(err(format!(
                    "array '{}' is {:?} but model input '{}' is {}",
                    array.name,
                    dt,
                    spec.name,
                    dtype_name(spec.elem_type)
                )));
            }
            let shape = &array.shape;
            if shape.is_empty() {
                return Err(err(format!(
                    "array '{}' is a scalar; it needs a leading sample axis",
                    array.name
                )));
            }
            if let Some(dims) = &spec.dims {
                let sample = &shape[1..];
                let fits = sample.len() == dims.len()
                    && sample.iter().zip(dims).all(|(&s, d)| d.is_none_or(|d| d == s as u64));
                if !fits {
                    return Err(err(format!(
                        "array '{}' has samples of shape {:?} (after the leading sample axis of {}), which does not fit model input '{}': {}",
                        array.name, sample, shape[0], spec.name, spec.describe()
                    )));
                }
            }
            bound.push((spec.name.clone(), array));
        }
        for a in &self.arrays {
            if !a.name.is_empty() && !inputs.iter().any(|s| s.name == a.name) {
                let names = inputs
                    .iter()
                    .map(|s| format!("'{}'", s.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(err(format!(
                    "array '{}' is not a model input (inputs: {names}); prefix labels with '_'",
                    a.name
                )));
            }
        }
        let counts: Vec<usize> = bound.iter().map(|(_, a)| a.shape[0]).collect();
        if counts.windows(2).any(|w| w[0] != w[1]) {
            let detail = bound
                .iter()
                .map(|(n, a)| format!("'{n}': {}", a.shape[0]))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(err(format!("arrays disagree on the number of samples ({detail})")));
        }
        let samples = counts.first().copied().unwrap_or(0);
        if samples == 0 {
            return Err(err("holds no samples".into()));
        }
        Ok(BoundData { arrays: bound, samples })
    }
}

/// Data matched to a model's inputs.
#[derive(Debug)]
pub struct BoundData<'a> {
    arrays: Vec<(String, &'a DataArray)>,
    pub samples: usize,
}

impl BoundData<'_> {
    /// The input shapes of one sample, in model-input order (what tract's plan is fixed to).
    pub fn sample_shapes(&self) -> Vec<(String, DatumType, Vec<usize>)> {
        self.arrays
            .iter()
            .map(|(n, a)| (n.clone(), a.dtype, a.shape[1..].to_vec()))
            .collect()
    }

    /// The inputs of sample `i`, in model-input order.
    pub fn sample(&self, i: usize) -> Result<Vec<TValue>> {
        self.arrays
            .iter()
            .map(|(_, a)| Ok(a.sample(i)?.into_tvalue()))
            .collect()
    }
}

/// Writes arrays to a `.npz` atomically: each is `[samples, ...]`, stacked from per-sample
/// tensors. f32 and i64 are kept; other numeric types are written as f32.
pub fn write_npz(path: &Path, arrays: &[(String, Vec<Tensor>)]) -> Result<()> {
    use npyz::WriterBuilder;
    let err = |e: String| Error::data(path, e);
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut npz = npyz::npz::NpzWriter::new(&mut buf);
        let options =
            npyz::zip::write::FileOptions::default().compression_method(npyz::zip::CompressionMethod::Deflated);
        for (name, samples) in arrays {
            let Some(first) = samples.first() else { continue };
            let mut shape = vec![samples.len() as u64];
            shape.extend(first.shape().iter().map(|&d| d as u64));
            if samples.iter().any(|s| s.shape() != first.shape()) {
                return Err(err(format!("'{name}': samples have different shapes, cannot stack")));
            }
            macro_rules! write {
                ($t:ty) => {{
                    let mut w = npz
                        .array::<$t>(name, options)
                        .and_then(|b| b.default_dtype().shape(&shape).begin_nd())
                        .map_err(|e| err(e.to_string()))?;
                    for s in samples {
                        let s = s.cast_to::<$t>().map_err(tract_to_string).map_err(err)?;
                        let view = s
                            .to_plain_array_view::<$t>()
                            .map_err(tract_to_string)
                            .map_err(err)?;
                        w.extend(view.iter().copied()).map_err(|e| err(e.to_string()))?;
                    }
                    w.finish().map_err(|e| err(e.to_string()))?;
                }};
            }
            match first.datum_type() {
                DatumType::I64 => write!(i64),
                _ => write!(f32),
            }
        }
        npz.zip_writer().finish().map_err(|e| err(e.to_string()))?;
    }
    crate::onnx::write_atomic(path, &buf.into_inner())
}

fn tract_to_string(e: tract_onnx::prelude::TractError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .npz of one f32 array `x` `[3, 2, 5]`, stored or deflated.
    fn npz(path: &Path, method: npyz::zip::CompressionMethod) -> Vec<f32> {
        use npyz::WriterBuilder;
        let values: Vec<f32> = (0..30).map(|i| i as f32 * 0.25 - 3.0).collect();
        let file = std::fs::File::create(path).unwrap();
        let mut npz = npyz::npz::NpzWriter::new(file);
        let options = npyz::zip::write::FileOptions::default().compression_method(method);
        let mut w = npz
            .array::<f32>("x", options)
            .and_then(|b| b.default_dtype().shape(&[3, 2, 5]).begin_nd())
            .unwrap();
        w.extend(values.iter().copied()).unwrap();
        w.finish().unwrap();
        npz.zip_writer().finish().unwrap();
        values
    }

    #[test]
    fn stored_arrays_are_read_in_place_with_the_values_of_compressed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (stored, deflated) = (dir.path().join("s.npz"), dir.path().join("d.npz"));
        let values = npz(&stored, npyz::zip::CompressionMethod::Stored);
        npz(&deflated, npyz::zip::CompressionMethod::Deflated);
        let (s, d) = (Dataset::load(&stored).unwrap(), Dataset::load(&deflated).unwrap());
        assert!(matches!(s.arrays[0].values, Values::File { .. }));
        assert!(matches!(d.arrays[0].values, Values::Memory(_)));
        assert_eq!(
            (s.arrays[0].dtype, &s.arrays[0].shape),
            (DatumType::F32, &vec![3, 2, 5])
        );
        for i in 0..3 {
            let (a, b) = (s.arrays[0].sample(i).unwrap(), d.arrays[0].sample(i).unwrap());
            assert_eq!(a, b, "sample {i}");
            assert_eq!(a.shape(), &[2, 5]);
            assert_eq!(crate::runtime::to_f32_vec(&a).unwrap(), &values[i * 10..(i + 1) * 10]);
        }
    }
}
