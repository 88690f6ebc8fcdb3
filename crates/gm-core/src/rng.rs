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
        crate::traffic::upload(v, shape, device)
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
        let v = self.uniform_vec(shape.elem_count(), lo, hi);
        crate::traffic::upload(v, shape, device)
    }

    /// `n` uniform f32 values in `[lo, hi)` (the numbers [`GmRng::uniform`] draws).
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.inner.random::<f32>())
            .collect()
    }

    /// Draws `x ~ Bernoulli(p)` elementwise; returns 0/1 values in `p`'s dtype and device.
    pub fn bernoulli(&mut self, p: &Tensor) -> Result<Tensor> {
        let u = self.uniform(p.shape(), 0.0, 1.0, p.device())?;
        u.lt(&p.to_dtype(DType::F32)?)?.to_dtype(p.dtype())
    }

    /// [`GmRng::uniform`] for data prepared on the host and uploaded as part of a batch: the same
    /// numbers, not counted as an upload of their own ([`crate::traffic`]).
    pub fn host_uniform<S: Into<Shape>>(&mut self, shape: S, lo: f32, hi: f32) -> Result<Tensor> {
        let shape = shape.into();
        let v = self.uniform_vec(shape.elem_count(), lo, hi);
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// [`GmRng::bernoulli`] for host data (see [`GmRng::host_uniform`]); `p` must be on the CPU.
    pub fn host_bernoulli(&mut self, p: &Tensor) -> Result<Tensor> {
        let u = self.host_uniform(p.shape(), 0.0, 1.0)?;
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

/// A `VarBuilder` backend that creates missing variables in a `VarMap` with values drawn from a
/// [`GmRng`] (candle's own initialisers use its unseedable RNG). The initialiser hints of candle's
/// layers are honoured exactly; only the source of randomness changes. Variables are drawn in
/// creation order, so the same model, config and seed give the same initial weights.
struct SeededInit {
    varmap: candle_nn::VarMap,
    rng: std::sync::Mutex<GmRng>,
}

fn init_tensor(s: &Shape, init: candle_nn::Init, rng: &mut GmRng, dev: &Device) -> Result<Tensor> {
    use candle_nn::init::{Init, NormalOrUniform};
    let normal =
        |rng: &mut GmRng, mean: f64, std: f64| rng.randn(s.clone(), dev)?.affine(std, mean);
    match init {
        Init::Const(c) => Tensor::ones(s.clone(), DType::F32, dev)?.affine(c, 0.0),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Uniform { lo, up } => rng.uniform(s.clone(), lo as f32, up as f32, dev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(s) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let b = (3f64.sqrt() * std) as f32;
                    rng.uniform(s.clone(), -b, b, dev)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = self.rng.lock().expect("rng lock");
        let t = init_tensor(&s, h, &mut rng, dev)?.to_dtype(dtype)?;
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded var builder: '{name}' must be created with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

/// A `VarBuilder` whose new variables land in `varmap`, initialised reproducibly from `seed`.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarMap;
/// let (a, b) = (VarMap::new(), VarMap::new());
/// let la = candle_nn::linear(4, 3, gm_core::rng::seeded_var_builder(&a, 5, DType::F32, &Device::Cpu)).unwrap();
/// let lb = candle_nn::linear(4, 3, gm_core::rng::seeded_var_builder(&b, 5, DType::F32, &Device::Cpu)).unwrap();
/// assert_eq!(la.weight().to_vec2::<f32>().unwrap(), lb.weight().to_vec2::<f32>().unwrap());
/// ```
pub fn seeded_var_builder(
    varmap: &candle_nn::VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_nn::VarBuilder<'static> {
    let backend = SeededInit {
        varmap: varmap.clone(),
        rng: std::sync::Mutex::new(GmRng::new(seed).derive(0x1417)),
    };
    candle_nn::VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
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
