//! GGUF reader (format versions 2 and 3), memory-mapped.
//!
//! Layout, all little-endian: magic `GGUF`, version u32, tensor count u64, metadata count u64,
//! the metadata key/value pairs, the tensor infos, padding to `general.alignment`, then the
//! data section that every tensor offset is relative to.
//!
//! Every count and length read from the file is checked against the bytes that remain before
//! anything is allocated for it, so a corrupt or hostile header gives a [`GgufError`], never a
//! panic or a multi-gigabyte allocation. All tensors are bounds-checked when the file is opened,
//! so [`GgufFile::tensor`] cannot fail on a file that opened.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferroserve_kernels::quant::QuantType;
use memmap2::Mmap;

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`: ggml cannot represent a tensor with more dimensions.
const MAX_DIMS: u32 = 4;
/// The spec allows arrays of arrays; no real writer nests deeper than this, and the limit keeps
/// a crafted file from recursing the stack away.
const MAX_ARRAY_NESTING: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: starts with bytes {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {0} (this reader supports versions 2 and 3)")]
    UnsupportedVersion(u32),
    /// The file ends before something it declares: a cut-off download, or a corrupt count.
    #[error("GGUF file is truncated or corrupt: {what}: {needed} bytes needed at offset {offset}, only {available} remain")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("corrupt GGUF file: {0}")]
    Corrupt(String),
    #[error("tensor '{tensor}' has unknown or unsupported ggml type id {type_id}{}", type_id_label(*type_id))]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error("GGUF metadata key '{0}' is missing")]
    MissingKey(String),
    #[error("GGUF metadata key '{key}' holds {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor '{0}' is not in the GGUF file")]
    TensorNotFound(String),
    #[error("unsupported model architecture '{0}': only llama-family models are supported")]
    UnsupportedArchitecture(String),
    #[error("invalid model hyperparameters: {0}")]
    InvalidHparams(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// A tensor's stored type is a [`QuantType`]: the kernels' format table
/// ([`QuantType::info`]) gives its ggml id, block size and bytes, so a file opens only when
/// every tensor is in a format something here reads (a file with others could not be served,
/// and cannot be bounds-checked without their sizes). The ggml types we do not read keep only
/// their names, for the error message.
fn unread_ggml_type_name(id: u32) -> Option<&'static str> {
    // ggml/include/ggml.h's `enum ggml_type`, less the ids `QuantType` reads and the removed
    // ones (4, 5: Q4_2, Q4_3; 31–33: Q4_0_4_4 and friends).
    Some(match id {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The words the error message adds after a type id: the ggml name where ggml has one.
fn type_id_label(id: u32) -> String {
    match unread_ggml_type_name(id) {
        Some(name) => format!(" ({name}, which no kernel here reads)"),
        None => String::new(),
    }
}

/// One metadata value. Arrays hold values of a single type (the spec guarantees it and the
/// reader enforces it).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer type, widened. Writers disagree on integer widths (a token id may be u32 in
    /// one file and i32 in another), so the typed accessors accept every lossless conversion.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_u32(&self) -> Option<u32> {
        self.as_i128().and_then(|v| u32::try_from(v).ok())
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    pub fn as_i32(&self) -> Option<i32> {
        self.as_i128().and_then(|v| i32::try_from(v).ok())
    }

    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages: the type, plus the element type for arrays.
    fn describe(&self) -> String {
        match self {
            GgufValue::Array(items) => match items.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".to_owned(),
            },
            other => other.type_name().to_owned(),
        }
    }
}

/// Where one tensor lives in the file. `shape` is row-major (outermost dimension first, as in
/// PyTorch and safetensors), i.e. GGUF's `ne` reversed: the last dimension is the contiguous
/// one, and quantization blocks run along it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: QuantType,
    /// Byte offset from the start of the data section.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor's bytes, borrowed from the memory map. The data section starts on a
/// `general.alignment` boundary (32 by default) and the mmap is page-aligned, so `bytes` is at
/// least that aligned in memory.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    /// Row-major, outermost first (see [`TensorInfo`]).
    pub shape: &'a [usize],
    pub dtype: QuantType,
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open GGUF file: parsed metadata and tensor directory over a read-only memory map.
pub struct GgufFile {
    path: PathBuf,
    /// Kept open for [`GgufFile::read_copy`], which reads without mapping pages.
    file: File,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io_err)?;
        // Safety: the map is read-only and lives as long as the views borrowed from it. Like
        // every mmap-based loader (llama.cpp, safetensors) we rely on the model file not being
        // truncated or rewritten by another process while it is being served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let parsed = parse(&mmap)?;
        Ok(GgufFile {
            path,
            file,
            mmap,
            version: parsed.version,
            alignment: parsed.alignment,
            data_start: parsed.data_start,
            metadata_index: parsed
                .metadata
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect(),
            metadata: parsed.metadata,
            tensor_index: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: parsed.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Looks `key` up and converts it; `Ok(None)` when absent, an error when of the wrong type.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => convert(value)
                .map(Some)
                .ok_or_else(|| GgufError::WrongType {
                    key: key.to_owned(),
                    expected,
                    found: value.describe(),
                }),
        }
    }

    fn required<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<T> {
        self.typed(key, expected, convert)?
            .ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.required(key, "an integer fitting u32", GgufValue::as_u32)
    }

    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "an integer fitting u32", GgufValue::as_u32)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.required(key, "an integer fitting u64", GgufValue::as_u64)
    }

    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "an integer fitting u64", GgufValue::as_u64)
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.required(key, "a float", GgufValue::as_f32)
    }

    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "a float", GgufValue::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.required(key, "a bool", GgufValue::as_bool)
    }

    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.required(key, "a string", GgufValue::as_str)
    }

    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        self.required(key, "an array", GgufValue::as_array)
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let items = self.get_array(key)?;
        items
            .iter()
            .map(GgufValue::as_str)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.wrong_array(key, "an array of strings"))
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        let items = self.get_array(key)?;
        items
            .iter()
            .map(GgufValue::as_i32)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.wrong_array(key, "an array of integers fitting i32"))
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let items = self.get_array(key)?;
        items
            .iter()
            .map(GgufValue::as_f32)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.wrong_array(key, "an array of floats"))
    }

    fn wrong_array(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            key: key.to_owned(),
            expected,
            found: self.get(key).map(GgufValue::describe).unwrap_or_default(),
        }
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The tensor directory, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_owned()))?;
        // Bounds were checked in `parse`, so this slice cannot go out of range.
        let start = self.data_start + info.offset;
        Ok(TensorView {
            name: &info.name,
            shape: &info.shape,
            dtype: info.dtype,
            bytes: &self.mmap[start..start + info.n_bytes],
        })
    }

    /// Drops this process's resident pages of `bytes`, a tensor's slice of this file's map,
    /// once a loader has repacked it and reads only the copy: without it a repacked model
    /// holds its weights twice in RSS (the 1B Q4_K_M file: 1.4 GB idle instead of 0.8).
    /// Only whole pages inside the slice are dropped, so a neighbour's bytes stay resident.
    /// Reading `bytes` again stays correct, just slower: the map is read-only and never
    /// written, so a dropped page is read back from the page cache with the file's bytes.
    pub fn release_resident(&self, bytes: &[u8]) {
        let start = self.offset_in_map(bytes);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let first = start.next_multiple_of(page);
        let end = (start + bytes.len()) / page * page;
        if end > first {
            // SAFETY: see above: MADV_DONTNEED on a read-only file mapping changes
            // residency, never contents; the borrowers of these bytes see the same values.
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first) };
        }
    }

    /// Copies `bytes`, a slice of this file's map, into `out` by reading the file (`pread`)
    /// instead of through the map, so no page of it becomes resident in this process. For
    /// tensors read a row at a time whose bulk is otherwise not needed, such as a token
    /// embedding table: gathered through the map, each row faults in the page cache's pages
    /// around it (64 KiB at a time), and over enough distinct tokens the whole table is
    /// resident again (the 1B-shape model's 79 MB table under a c=64 load).
    ///
    /// A failed read (the file shrank under the server, which [`GgufFile::open`] already
    /// assumes never happens) falls back to copying through the map.
    pub fn read_copy(&self, bytes: &[u8], out: &mut [u8]) {
        assert_eq!(bytes.len(), out.len(), "read_copy: destination length");
        let offset = self.offset_in_map(bytes) as u64;
        if self.file.read_exact_at(out, offset).is_err() {
            out.copy_from_slice(bytes);
        }
    }

    /// Where `bytes` starts in the file; panics unless it is a slice of this file's map.
    fn offset_in_map(&self, bytes: &[u8]) -> usize {
        let base = self.mmap.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        assert!(start >= base && start + bytes.len() <= base + self.mmap.len(), "a slice of this map");
        start - base
    }

    pub fn llama_hparams(&self) -> Result<LlamaHparams> {
        LlamaHparams::from_gguf(self)
    }
}

/// Architectures whose weights and graph match llama's (`general.architecture`).
const LLAMA_FAMILY: &[&str] = &["llama"];

/// The hyperparameters a llama-family forward pass needs, from the `{arch}.*` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaHparams {
    pub architecture: String,
    pub block_count: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    /// Per-head width: `attention.key_length` if given, else `embedding_length / head_count`.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (`rope.dimension_count`, default `head_dim`).
    pub rope_dimension_count: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl LlamaHparams {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.architecture()?;
        if !LLAMA_FAMILY.contains(&arch) {
            return Err(GgufError::UnsupportedArchitecture(arch.to_owned()));
        }
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let count = |suffix: &str| -> Result<usize> { Ok(gguf.get_u32(&key(suffix))? as usize) };
        let count_opt = |suffix: &str| -> Result<Option<usize>> {
            Ok(gguf.get_u32_opt(&key(suffix))?.map(|v| v as usize))
        };

        let block_count = count("block_count")?;
        let embedding_length = count("embedding_length")?;
        let feed_forward_length = count("feed_forward_length")?;
        let head_count = count("attention.head_count")?;
        // Absent means plain multi-head attention, as in llama.cpp.
        let head_count_kv = count_opt("attention.head_count_kv")?.unwrap_or(head_count);
        let context_length = count("context_length")?;
        let rms_norm_eps = gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        // llama.cpp's default when a converter left the key out.
        let rope_freq_base = gguf
            .get_f32_opt(&key("rope.freq_base"))?
            .unwrap_or(10_000.0);

        let invalid = |msg: String| Err(GgufError::InvalidHparams(msg));
        if block_count == 0 || embedding_length == 0 || feed_forward_length == 0 {
            return invalid(format!(
                "block_count {block_count}, embedding_length {embedding_length} and \
                 feed_forward_length {feed_forward_length} must all be non-zero"
            ));
        }
        if head_count == 0 || head_count_kv == 0 || !head_count.is_multiple_of(head_count_kv) {
            return invalid(format!(
                "head_count {head_count} must be a non-zero multiple of head_count_kv {head_count_kv}"
            ));
        }
        let head_dim = match count_opt("attention.key_length")? {
            Some(dim) => dim,
            None if embedding_length.is_multiple_of(head_count) => embedding_length / head_count,
            None => return invalid(format!(
                "embedding_length {embedding_length} is not divisible by head_count {head_count}"
            )),
        };
        let rope_dimension_count = count_opt("rope.dimension_count")?.unwrap_or(head_dim);
        if head_dim == 0 || rope_dimension_count > head_dim || !rope_dimension_count.is_multiple_of(2) {
            return invalid(format!(
                "rope.dimension_count {rope_dimension_count} must be even and at most the head \
                 width {head_dim}"
            ));
        }
        // Also rejects NaN, which a plain `<= 0.0` test would let through.
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !positive(rms_norm_eps) || !positive(rope_freq_base) {
            return invalid(format!(
                "rms epsilon {rms_norm_eps} and rope.freq_base {rope_freq_base} must be positive"
            ));
        }
        // Older converters omit `{arch}.vocab_size`; the token list is authoritative then.
        let vocab_size = match count_opt("vocab_size")? {
            Some(n) => n,
            None => gguf.get_array("tokenizer.ggml.tokens")?.len(),
        };
        if vocab_size == 0 {
            return invalid("vocabulary is empty".to_owned());
        }

        Ok(LlamaHparams {
            architecture: arch.to_owned(),
            block_count,
            embedding_length,
            feed_forward_length,
            head_count,
            head_count_kv,
            head_dim,
            rope_dimension_count,
            rope_freq_base,
            rms_norm_eps,
            context_length,
            vocab_size,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

struct Parsed {
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
}

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut cur = Cursor { bytes, pos: 0 };

    let magic = cur.take(4, "magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    // Version 1 used 32-bit counts and is long gone; a byte-swapped (big-endian) file shows up
    // here as a huge version number.
    let version = cur.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = cur.u64("tensor count")?;
    let kv_count = cur.u64("metadata count")?;

    // Smallest possible key/value: empty key (8-byte length) + type (4) + one byte of value.
    let kv_count = cur.check_count(kv_count, 8 + 4 + 1, "metadata entries")?;
    let mut metadata = Vec::with_capacity(kv_count);
    let mut seen = HashMap::with_capacity(kv_count);
    for _ in 0..kv_count {
        let key = cur.string("metadata key")?;
        let value_type = cur.u32("metadata value type")?;
        let value = read_value(&mut cur, value_type, 0)
            .map_err(|e| with_context(e, &format!("metadata key '{key}'")))?;
        if seen.insert(key.clone(), ()).is_some() {
            return Err(GgufError::Corrupt(format!(
                "duplicate metadata key '{key}'"
            )));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(GgufError::Corrupt(format!(
                "general.alignment must be a power-of-two u32, found {v:?}"
            )))
        }
    };

    // Smallest possible tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
    let tensor_count = cur.check_count(tensor_count, 8 + 4 + 4 + 8, "tensor infos")?;
    let mut raw_tensors = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        raw_tensors.push(read_tensor_info(&mut cur)?);
    }

    let file_len = bytes.len() as u64;
    let data_start = align_up(cur.pos as u64, alignment)
        .ok_or_else(|| GgufError::Corrupt("data section offset overflows".to_owned()))?;
    let data_len = file_len.saturating_sub(data_start);

    let mut tensors = Vec::with_capacity(raw_tensors.len());
    let mut names = HashMap::with_capacity(raw_tensors.len());
    for raw in raw_tensors {
        if names.insert(raw.name.clone(), ()).is_some() {
            return Err(GgufError::Corrupt(format!(
                "duplicate tensor name '{}'",
                raw.name
            )));
        }
        tensors.push(check_tensor(raw, alignment, data_start, data_len)?);
    }

    Ok(Parsed {
        version,
        alignment,
        // Fits: every tensor ends inside the file, and with no tensors it is at most
        // `file_len + alignment`, far below usize::MAX for anything that could be mapped.
        data_start: usize::try_from(data_start)
            .map_err(|_| GgufError::Corrupt("data section offset overflows".to_owned()))?,
        metadata,
        tensors,
    })
}

struct RawTensorInfo {
    name: String,
    /// GGUF order: `ne[0]` (contiguous) first.
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

fn read_tensor_info(cur: &mut Cursor<'_>) -> Result<RawTensorInfo> {
    let name = cur.string("tensor name")?;
    let n_dims = cur.u32("tensor dimension count")?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::Corrupt(format!(
            "tensor '{name}' has {n_dims} dimensions, ggml allows at most {MAX_DIMS}"
        )));
    }
    let ne = (0..n_dims)
        .map(|_| cur.u64("tensor dimension"))
        .collect::<Result<Vec<_>>>()?;
    let type_id = cur.u32("tensor type")?;
    let offset = cur.u64("tensor offset")?;
    Ok(RawTensorInfo {
        name,
        ne,
        type_id,
        offset,
    })
}

fn check_tensor(
    raw: RawTensorInfo,
    alignment: u64,
    data_start: u64,
    data_len: u64,
) -> Result<TensorInfo> {
    let name = raw.name;
    let dtype = QuantType::from_ggml_type(raw.type_id).ok_or_else(|| GgufError::UnknownTensorType {
        tensor: name.clone(),
        type_id: raw.type_id,
    })?;
    let corrupt = |msg: String| GgufError::Corrupt(format!("tensor '{name}': {msg}"));

    let n_elements = raw
        .ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| corrupt(format!("element count of shape {:?} overflows", raw.ne)))?;
    // Blocks never straddle rows, so the row length itself must be whole blocks.
    let row_len = raw.ne.first().copied().unwrap_or(1);
    let block_elems = dtype.block_elems() as u64;
    if !row_len.is_multiple_of(block_elems) {
        return Err(corrupt(format!(
            "row length {row_len} is not a multiple of the {dtype} block size {block_elems}"
        )));
    }
    // Whole rows, so whole blocks: the division is exact.
    let n_bytes = (n_elements / block_elems)
        .checked_mul(dtype.block_bytes() as u64)
        .ok_or_else(|| corrupt(format!("byte size of shape {:?} overflows", raw.ne)))?;
    if !raw.offset.is_multiple_of(alignment) {
        return Err(corrupt(format!(
            "offset {} is not a multiple of the alignment {alignment}",
            raw.offset
        )));
    }
    let end = raw
        .offset
        .checked_add(n_bytes)
        .ok_or_else(|| corrupt(format!("offset {} overflows", raw.offset)))?;
    if end > data_len {
        return Err(GgufError::Truncated {
            what: "tensor data",
            offset: data_start.saturating_add(raw.offset),
            needed: n_bytes,
            available: data_len.saturating_sub(raw.offset),
        });
    }

    // Everything is inside the mapped file now, so it fits usize.
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| corrupt(format!("{v} overflows usize")));
    Ok(TensorInfo {
        shape: raw
            .ne
            .iter()
            .rev()
            .map(|&d| to_usize(d))
            .collect::<Result<_>>()?,
        dtype,
        offset: to_usize(raw.offset)?,
        n_bytes: to_usize(n_bytes)?,
        name,
    })
}

fn read_value(cur: &mut Cursor<'_>, value_type: u32, depth: u32) -> Result<GgufValue> {
    Ok(match value_type {
        0 => GgufValue::U8(cur.array::<1>("u8")?[0]),
        1 => GgufValue::I8(i8::from_le_bytes(cur.array("i8")?)),
        2 => GgufValue::U16(u16::from_le_bytes(cur.array("u16")?)),
        3 => GgufValue::I16(i16::from_le_bytes(cur.array("i16")?)),
        4 => GgufValue::U32(cur.u32("u32")?),
        5 => GgufValue::I32(i32::from_le_bytes(cur.array("i32")?)),
        6 => GgufValue::F32(f32::from_le_bytes(cur.array("f32")?)),
        7 => GgufValue::Bool(cur.array::<1>("bool")?[0] != 0),
        8 => GgufValue::String(cur.string("string value")?),
        9 => {
            if depth >= MAX_ARRAY_NESTING {
                return Err(GgufError::Corrupt(format!(
                    "arrays nested more than {MAX_ARRAY_NESTING} deep"
                )));
            }
            let elem_type = cur.u32("array element type")?;
            let count = cur.u64("array length")?;
            let min_size = min_value_size(elem_type)?;
            let count = cur.check_count(count, min_size, "array elements")?;
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(read_value(cur, elem_type, depth + 1)?);
            }
            GgufValue::Array(items)
        }
        10 => GgufValue::U64(cur.u64("u64")?),
        11 => GgufValue::I64(i64::from_le_bytes(cur.array("i64")?)),
        12 => GgufValue::F64(f64::from_le_bytes(cur.array("f64")?)),
        other => {
            return Err(GgufError::Corrupt(format!(
                "unknown metadata value type {other}"
            )))
        }
    })
}

/// The fewest bytes one value of `value_type` can occupy; bounds array lengths before
/// allocating.
fn min_value_size(value_type: u32) -> Result<u64> {
    Ok(match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8, // a string is at least its u64 length
        9 => 4 + 8,       // a nested array is at least its type and length
        other => {
            return Err(GgufError::Corrupt(format!(
                "unknown metadata value type {other}"
            )))
        }
    })
}

fn with_context(err: GgufError, context: &str) -> GgufError {
    match err {
        GgufError::Corrupt(msg) => GgufError::Corrupt(format!("{context}: {msg}")),
        other => other,
    }
}

fn align_up(pos: u64, alignment: u64) -> Option<u64> {
    Some(pos.checked_add(alignment - 1)? / alignment * alignment)
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        let n = n as usize; // <= remaining, so it fits
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        Ok(slice.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let len = self.u64(what)?;
        let offset = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|e| GgufError::Corrupt(format!("{what} at offset {offset} is not UTF-8: {e}")))
    }

    /// Rejects a count that could not fit in the remaining bytes even at `min_size` bytes per
    /// item, so a corrupt count cannot drive a huge `Vec::with_capacity`.
    fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<usize> {
        let Some(needed) = count.checked_mul(min_size) else {
            return Err(GgufError::Corrupt(format!(
                "absurd count of {what} ({count}) at offset {}",
                self.pos
            )));
        };
        if needed > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos as u64,
                needed,
                available: self.remaining(),
            });
        }
        Ok(count as usize) // count * min_size <= remaining, so it fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for id in 0..64 {
            if let Some(t) = QuantType::from_ggml_type(id) {
                assert_eq!(t.ggml_type(), id);
                assert_eq!(unread_ggml_type_name(id), None, "{t} is read, not only named");
            }
        }
        assert_eq!(QuantType::from_ggml_type(12), Some(QuantType::Q4_K));
        assert_eq!(QuantType::from_ggml_type(30), Some(QuantType::BF16));
        assert_eq!(QuantType::from_ggml_type(4), None); // removed Q4_2
        assert_eq!(QuantType::from_ggml_type(20), Some(QuantType::IQ4_NL));
        assert_eq!(QuantType::IQ4_NL.row_bytes(64), 36);
        assert_eq!(QuantType::Q4_1.row_bytes(64), 40);
        let err = GgufError::UnknownTensorType { tensor: "w".into(), type_id: 10 };
        assert_eq!(
            err.to_string(),
            "tensor 'w' has unknown or unsupported ggml type id 10 (Q2_K, which no kernel here reads)"
        );
    }

    #[test]
    fn empty_and_tiny_inputs_are_errors() {
        assert!(matches!(parse(b""), Err(GgufError::Truncated { .. })));
        assert!(matches!(parse(b"GGU"), Err(GgufError::Truncated { .. })));
        assert!(matches!(
            parse(b"GGML\x03\0\0\0"),
            Err(GgufError::BadMagic { .. })
        ));
        assert!(matches!(
            parse(b"GGUF\x01\0\0\0"),
            Err(GgufError::UnsupportedVersion(1))
        ));
    }

    #[test]
    fn absurd_counts_are_rejected_without_allocating() {
        let mut file = b"GGUF".to_vec();
        file.extend(3u32.to_le_bytes());
        file.extend(0u64.to_le_bytes()); // tensors
        file.extend(1u64.to_le_bytes()); // one key
        file.extend(1u64.to_le_bytes());
        file.extend(b"k");
        file.extend(9u32.to_le_bytes()); // array
        file.extend(8u32.to_le_bytes()); // of strings
        file.extend(u64::MAX.to_le_bytes());
        let Err(err) = parse(&file) else {
            panic!("an absurd array length parsed")
        };
        assert!(
            matches!(err, GgufError::Corrupt(ref m) if m.contains("absurd")),
            "{err}"
        );
    }
}
