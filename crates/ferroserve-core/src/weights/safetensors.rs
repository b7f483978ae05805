//! Memory-mapped safetensors files, read through the `safetensors` crate.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A memory-mapped safetensors file. Tensors are converted to owned f32 on request
/// (the BERT path repacks every weight for the GEMM anyway).
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::model_load(path, e))?;
        // SAFETY: the file is opened read-only; model files are not modified while served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::model_load(path, e))?;
        SafeTensors::deserialize(&mmap).map_err(|e| Error::model_load(path, format!("not a valid safetensors file: {e}")))?;
        Ok(Self { path: path.to_owned(), mmap })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated in open()")
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors().names().into_iter().map(str::to_owned).collect()
    }

    /// The tensor `name` as f32 with its shape; F32, F16 and BF16 are accepted.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| Error::model_load(&self.path, format!("missing tensor {name}")))?;
        let bytes = t.data();
        let data = match t.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
            other => return Err(Error::model_load(&self.path, format!("tensor {name} has unsupported dtype {other:?}"))),
        };
        Ok((data, t.shape().to_vec()))
    }

    /// Like [`f32`](Self::f32) but checks the shape.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (data, got) = self.f32(name)?;
        if got != shape {
            return Err(Error::model_load(&self.path, format!("tensor {name} has shape {got:?}, expected {shape:?}")));
        }
        Ok(data)
    }
}

/// IEEE half → single precision (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m · 2^-24.
            let v = m as f32 * (1.0 / (1 << 24) as f32);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
