//! Safetensors checkpoints, single-file or sharded, memory-mapped.
//!
//! Each file is mapped once; a tensor is read once, when the backend takes it. f32 tensors that are
//! aligned in the map are handed out as views of the map (no copy). bf16/f16 tensors are widened
//! to f32 in parallel ([`Checkpoint::tensor`]), or, for a backend that computes with them as they
//! are (the CPU backend), handed out as 16-bit views of the map ([`Checkpoint::half_tensor`]). A missing file, a truncated file, a missing tensor or a wrong shape is an error naming
//! the file and tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// f32 data either borrowed from a memory map or owned.
pub enum F32Data {
    /// A view into a mapped file (already checked for alignment and length).
    Mapped {
        /// The mapping that owns the bytes.
        map: Arc<Mmap>,
        /// Byte offset of the first element.
        offset: usize,
        /// Number of f32 elements.
        len: usize,
    },
    /// Data converted or built in memory.
    Owned(Vec<f32>),
}

impl std::ops::Deref for F32Data {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Data::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + len * 4])
            }
            F32Data::Owned(v) => v,
        }
    }
}

/// A tensor on the host in f32, row-major.
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` elements.
    pub data: F32Data,
}

impl HostTensor {
    /// A tensor owning `data`.
    pub fn owned(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor {
            shape,
            data: F32Data::Owned(data),
        }
    }

    /// Stacks 2-D tensors (or 1-D vectors) along the first dimension into one owned tensor.
    pub fn concat_rows(parts: &[HostTensor]) -> HostTensor {
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        HostTensor::owned(shape, data)
    }
}

/// The 16-bit float formats a checkpoint may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    /// bfloat16: the upper half of an f32 (widening is a shift).
    Bf16,
    /// IEEE binary16.
    F16,
}

impl HalfKind {
    /// The value of one element's bits.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfKind::Bf16 => half::bf16::from_bits(bits).to_f32(),
            HalfKind::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }
}

/// 16-bit elements (bit patterns) either borrowed from a memory map or owned.
pub enum HalfData {
    /// A view into a mapped file (2-byte aligned).
    Mapped {
        /// The mapping that owns the bytes.
        map: Arc<Mmap>,
        /// Byte offset of the first element.
        offset: usize,
        /// Number of elements.
        len: usize,
    },
    /// Data copied or built in memory.
    Owned(Vec<u16>),
}

impl std::ops::Deref for HalfData {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        match self {
            HalfData::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + len * 2])
            }
            HalfData::Owned(v) => v,
        }
    }
}

/// A bf16 or f16 tensor on the host, row-major, as the checkpoint stores it.
pub struct HalfTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The element format.
    pub kind: HalfKind,
    /// `shape.iter().product()` elements.
    pub data: HalfData,
}

impl HalfTensor {
    /// The same values in f32 (exact).
    pub fn to_f32(&self) -> HostTensor {
        let kind = self.kind;
        let mut out = vec![0f32; self.data.len()];
        out.par_chunks_mut(1 << 16)
            .zip(self.data.par_chunks(1 << 16))
            .for_each(|(d, s)| {
                for (d, &b) in d.iter_mut().zip(s) {
                    *d = kind.to_f32(b);
                }
            });
        HostTensor::owned(self.shape.clone(), out)
    }
}

struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint directory, mapped but not yet read.
pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
    /// Bytes of tensor data read so far, and the tenths of [`Checkpoint::total_bytes`] already
    /// logged: a progress event each time another tenth has been read.
    read_bytes: AtomicUsize,
    logged_tenths: AtomicUsize,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index.clone(),
                    source,
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::checkpoint(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::checkpoint(&index, format!("weight_map[{tensor:?}] is not a file name"))
                })?;
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::io(
                    &single,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors or model.safetensors.index.json",
                    ),
                ));
            }
            vec!["model.safetensors".to_string()]
        };
        let mut ckpt = Checkpoint {
            files: Vec::new(),
            tensors: HashMap::new(),
            read_bytes: AtomicUsize::new(0),
            logged_tenths: AtomicUsize::new(0),
        };
        for name in shard_names {
            if name.contains('/') || name.contains("..") {
                return Err(Error::checkpoint(
                    &index,
                    format!("shard name {name:?} leaves the model directory"),
                ));
            }
            ckpt.add_file(dir.join(name))?;
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; a checkpoint modified while mapped is outside our contract,
        // as for every mmap-based loader (safetensors, candle, vLLM).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| Error::checkpoint(&path, format!("not a valid safetensors file: {e}")))?;
        let file_idx = self.files.len();
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let start = view.data().as_ptr() as usize - base;
            let entry = TensorEntry {
                file: file_idx,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                start,
                end: start + view.data().len(),
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(Error::checkpoint(
                    &path,
                    format!("tensor {name:?} appears in more than one shard"),
                ));
            }
        }
        drop(st);
        self.files.push((path, Arc::new(map)));
        Ok(())
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.end - t.start).sum()
    }

    /// Safetensors files mapped.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// Counts `bytes` more as read and logs progress when another tenth of the total is.
    fn note_read(&self, bytes: usize) {
        let read = self.read_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if !crate::logs::log_enabled!("autoglm::model", INFO) {
            return;
        }
        let total = self.total_bytes().max(1);
        let tenths = (read.saturating_mul(10) / total).min(10);
        let logged = self.logged_tenths.fetch_max(tenths, Ordering::Relaxed);
        if tenths > logged {
            tracing::info!(
                target: "autoglm::model",
                read_bytes = read,
                total_bytes = total,
                percent = tenths * 10,
                "loading weights"
            );
        }
    }

    fn some_path(&self) -> PathBuf {
        self.files.first().map(|f| f.0.clone()).unwrap_or_default()
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            Error::checkpoint(self.some_path(), format!("tensor {name:?} is missing"))
        })?;
        if entry.shape != shape {
            return Err(Error::checkpoint(
                &self.files[entry.file].0,
                format!(
                    "tensor {name:?} has shape {:?}, expected {:?}",
                    entry.shape, shape
                ),
            ));
        }
        Ok(entry)
    }

    /// Reads `name` as it is stored when that is bf16 or f16 (a view of the map when it is
    /// 2-byte aligned there, else a copy), checking it has `shape`; `None` for other dtypes.
    pub fn half_tensor(&self, name: &str, shape: &[usize]) -> Result<Option<HalfTensor>> {
        let entry = self.entry(name, shape)?;
        let kind = match entry.dtype {
            Dtype::BF16 => HalfKind::Bf16,
            Dtype::F16 => HalfKind::F16,
            _ => return Ok(None),
        };
        let map = &self.files[entry.file].1;
        let bytes = &map[entry.start..entry.end];
        let len = shape.iter().product::<usize>();
        let data = if cfg!(target_endian = "little")
            && bytemuck::try_cast_slice::<u8, u16>(bytes).is_ok()
        {
            HalfData::Mapped {
                map: map.clone(),
                offset: entry.start,
                len,
            }
        } else {
            HalfData::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )
        };
        self.note_read(bytes.len());
        Ok(Some(HalfTensor {
            shape: shape.to_vec(),
            kind,
            data,
        }))
    }

    /// Reads `name` as f32, checking it has `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let entry = self.entry(name, shape)?;
        let (path, map) = &self.files[entry.file];
        let bytes = &map[entry.start..entry.end];
        let len = shape.iter().product::<usize>();
        let data = match entry.dtype {
            Dtype::F32 => {
                if cfg!(target_endian = "little")
                    && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok()
                {
                    F32Data::Mapped {
                        map: map.clone(),
                        offset: entry.start,
                        len,
                    }
                } else {
                    F32Data::Owned(
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    )
                }
            }
            Dtype::BF16 => F32Data::Owned(widen(bytes, |b| half::bf16::from_bits(b).to_f32())),
            Dtype::F16 => F32Data::Owned(widen(bytes, |b| half::f16::from_bits(b).to_f32())),
            other => {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {name:?} has dtype {other:?}; supported: F32, BF16, F16"),
                ))
            }
        };
        self.note_read(bytes.len());
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

fn widen(bytes: &[u8], f: impl Fn(u16) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 2];
    out.par_chunks_mut(1 << 16)
        .zip(bytes.par_chunks(2 << 16))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f(u16::from_le_bytes([s[0], s[1]]));
            }
        });
    out
}
