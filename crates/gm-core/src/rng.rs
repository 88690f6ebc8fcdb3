//! One seeded random generator per run.
//!
//! Candle's CPU RNG cannot be seeded, so gm draws every random number (noise, binarisation,
//! shuffling) from a ChaCha8 stream on the host and uploads the tensor. The state is three
//! integers, saved in checkpoints, so a resumed run draws exactly the numbers the uninterrupted
//! run would have drawn.

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The serialisable position of a [`GmRng`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub stream: u64,
    /// Position in the key stream, in 32-bit words (a `u128`, stored as a decimal string).
    #[serde(with = "u128_string")]
    pub word_pos: u128,
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A seeded generator that makes tensors on any device.
///
/// ```
/// use candle_core::Device;
/// let mut a = gm_core::GmRng::new(7);
/// let mut b = gm_core::GmRng::new(7);
/// let x = a.randn((2, 3), &Device::Cpu).unwrap();
/// let y = b.randn((2, 3), &Device::Cpu).unwrap();
/// assert_eq!(x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct GmRng {
    seed: u64,
    inner: ChaCha8Rng,
}

impl GmRng {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// An independent generator for a named purpose (e.g. the data order of one epoch), derived
    /// from this one's seed without advancing it.
    pub fn derive(&self, stream: u64) -> GmRng {
        let mut inner = ChaCha8Rng::seed_from_u64(self.seed);
        inner.set_stream(stream.wrapping_add(1));
        GmRng {
            seed: self.seed,
            inner,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos(),
        }
    }

    pub fn from_state(s: RngState) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(s.seed);
        inner.set_stream(s.stream);
        inner.set_word_pos(s.word_pos);
        Self {
            seed: s.seed,
            inner,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A uniform `f64` in `[0, 1)`.
    pub fn uniform_f64(&mut self) -> f64 {
        self.inner.random::<f64>()
    }

    /// `n` standard-normal `f64`s.
    pub fn normal_vec_f64(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.inner))
            .collect()
    }

    /// A tensor of standard-normal f32 values.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut self.inner))
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// A tensor of uniform f32 values in `[lo, hi)`.
    pub fn uniform<S: Into<Shape>>(
        &mut self,
        shape: S,
        lo: f32,
        hi: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| lo + (hi - lo) * self.inner.random::<f32>())
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// Draws `x ~ Bernoulli(p)` elementwise; returns 0/1 values in `p`'s dtype and device.
    pub fn bernoulli(&mut self, p: &Tensor) -> Result<Tensor> {
        let u = self.uniform(p.shape(), 0.0, 1.0, p.device())?;
        u.lt(&p.to_dtype(DType::F32)?)?.to_dtype(p.dtype())
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.inner.random_range(0..=i);
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = GmRng::new(3);
        let _ = a.randn(17, &Device::Cpu).unwrap();
        let s = a.state();
        let x = a.randn(5, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let mut b = GmRng::from_state(serde_json::from_str(&json).unwrap());
        let y = b.randn(5, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn derived_streams_differ_and_repeat() {
        let a = GmRng::new(1);
        let p1 = a.derive(0).permutation(50);
        let p2 = a.derive(0).permutation(50);
        let p3 = a.derive(1).permutation(50);
        assert_eq!(p1, p2);
        assert_ne!(p1, p3);
        let mut sorted = p1.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn randn_moments() {
        let mut r = GmRng::new(0);
        let v = r
            .randn(100_000, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(m.abs() < 0.01, "mean {m}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
