//! One seeded random generator per run.
//!
//! Candle's CPU RNG cannot be seeded, so gm draws every random number (noise, binarisation,
//! shuffling) from ChaCha8 on the host and uploads the tensor. Two designs, one type:
//! - a stream ([`GmRng::new`]): one sequence per run, whose state (three integers) is saved in
//!   checkpoints, so a resumed run draws exactly the numbers the uninterrupted run would have;
//! - per sample ([`GmRng::per_sample`], `train.rng = "per-sample"`): every draw of a training
//!   step is a function of (seed, step, global sample index, draw number), so the numbers do not
//!   depend on how a batch is split over micro-batches or data-parallel ranks.

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
    /// `Some` for a per-sample generator ([`GmRng::per_sample`]).
    keyed: Option<Keyed>,
}

/// The key of a per-sample generator: every draw is a function of (seed, step, global sample
/// index, draw number), not of a position in one stream.
#[derive(Clone, Debug)]
struct Keyed {
    step: u64,
    /// Global index of the batch's first sample.
    offset: u64,
    /// Samples in the batch.
    n: usize,
    /// Draws made so far (each draw call takes the next number).
    call: u64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of a draw that is not per sample (shared by every sample of the step).
const SHARED: u64 = u64::MAX;

impl Keyed {
    /// The stream of draw `call` for global sample `index` (or [`SHARED`]).
    fn stream(&self, seed: u64, call: u64, index: u64) -> ChaCha8Rng {
        let mut k = splitmix(seed ^ 0x6A09_E667_F3BC_C908);
        for v in [self.step, index, call] {
            k = splitmix(k ^ splitmix(v));
        }
        ChaCha8Rng::seed_from_u64(k)
    }

    fn next_call(&mut self) -> u64 {
        self.call += 1;
        self.call - 1
    }
}

impl GmRng {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            inner: ChaCha8Rng::seed_from_u64(seed),
            keyed: None,
        }
    }

    /// A per-sample generator for the batch of training step `step` whose first sample has
    /// global index `offset` and which holds `n` samples: a tensor draw whose shape has an axis
    /// of size `n` (the first such axis is the sample axis) gives sample `i` the numbers of its
    /// own stream, keyed by (seed, step, `offset + i`, draw number); any other draw (a scalar, a
    /// vector, a tensor without such an axis) is shared by the whole step, keyed by (seed, step,
    /// draw number). So the numbers a sample sees do not depend on how the step's batch is cut
    /// into micro-batches or over ranks, and a resumed run draws them again from the key alone.
    pub fn per_sample(seed: u64, step: u64, offset: u64, n: usize) -> Self {
        Self {
            seed,
            inner: ChaCha8Rng::seed_from_u64(seed),
            keyed: Some(Keyed {
                step,
                offset,
                n,
                call: 0,
            }),
        }
    }

    pub fn is_per_sample(&self) -> bool {
        self.keyed.is_some()
    }

    /// An independent generator for a named purpose (e.g. the data order of one epoch), derived
    /// from this one's seed without advancing it.
    pub fn derive(&self, stream: u64) -> GmRng {
        let mut inner = ChaCha8Rng::seed_from_u64(self.seed);
        inner.set_stream(stream.wrapping_add(1));
        GmRng {
            seed: self.seed,
            inner,
            keyed: None,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The position of a stream generator (a per-sample one has none to save: its draws are
    /// functions of its key).
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
            keyed: None,
        }
    }

    /// The generator a shared (not per-sample) draw reads: the stream itself, or the draw's
    /// own keyed stream.
    fn shared<T>(&mut self, f: impl FnOnce(&mut ChaCha8Rng) -> T) -> T {
        match &mut self.keyed {
            None => f(&mut self.inner),
            Some(k) => {
                let call = k.next_call();
                f(&mut k.stream(self.seed, call, SHARED))
            }
        }
    }

    /// `shape.elem_count()` values in row-major order, each from `draw`: in sequence from the
    /// stream, or per sample along the sample axis.
    fn fill<T: Default + Clone>(
        &mut self,
        shape: &Shape,
        mut draw: impl FnMut(&mut ChaCha8Rng) -> T,
    ) -> Vec<T> {
        let count = shape.elem_count();
        let Some(k) = &mut self.keyed else {
            return (0..count).map(|_| draw(&mut self.inner)).collect();
        };
        let call = k.next_call();
        let dims = shape.dims();
        let Some(axis) = dims.iter().position(|&d| d == k.n) else {
            let mut r = k.stream(self.seed, call, SHARED);
            return (0..count).map(|_| draw(&mut r)).collect();
        };
        let pre: usize = dims[..axis].iter().product();
        let post: usize = dims[axis + 1..].iter().product();
        let mut v = vec![T::default(); count];
        for i in 0..k.n {
            let mut r = k.stream(self.seed, call, k.offset + i as u64);
            for p in 0..pre {
                let base = (p * k.n + i) * post;
                for slot in &mut v[base..base + post] {
                    *slot = draw(&mut r);
                }
            }
        }
        v
    }

    pub fn next_u64(&mut self) -> u64 {
        self.shared(|r| r.next_u64())
    }

    /// A uniform `f64` in `[0, 1)`.
    pub fn uniform_f64(&mut self) -> f64 {
        self.shared(|r| r.random::<f64>())
    }

    /// One `u64` per sample of the batch (`n` of them): the stream's next `n` (the numbers
    /// `n` calls of [`GmRng::next_u64`] give), or each sample's own for a per-sample generator
    /// whose batch has `n` samples.
    pub fn per_sample_u64(&mut self, n: usize) -> Vec<u64> {
        self.fill(&Shape::from(n), |r| r.next_u64())
    }

    /// One uniform `f64` in `[0, 1)` per sample (as [`GmRng::per_sample_u64`]).
    pub fn per_sample_f64(&mut self, n: usize) -> Vec<f64> {
        self.fill(&Shape::from(n), |r| r.random::<f64>())
    }

    /// `n` standard-normal `f64`s.
    pub fn normal_vec_f64(&mut self, n: usize) -> Vec<f64> {
        self.shared(|r| (0..n).map(|_| StandardNormal.sample(&mut *r)).collect())
    }

    /// A tensor of standard-normal f32 values.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = self.fill(&shape, |r| StandardNormal.sample(r));
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
        let v = self.fill(&shape, |r| lo + (hi - lo) * r.random::<f32>());
        crate::traffic::upload(v, shape, device)
    }

    /// `n` uniform f32 values in `[lo, hi)` (the numbers [`GmRng::uniform`] draws for a shape
    /// of `n` elements from a stream generator; shared by the step for a per-sample one).
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        self.shared(|r| (0..n).map(|_| lo + (hi - lo) * r.random::<f32>()).collect())
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
        let v = self.fill(&shape, |r| lo + (hi - lo) * r.random::<f32>());
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// [`GmRng::bernoulli`] for host data (see [`GmRng::host_uniform`]); `p` must be on the CPU.
    pub fn host_bernoulli(&mut self, p: &Tensor) -> Result<Tensor> {
        let u = self.host_uniform(p.shape(), 0.0, 1.0)?;
        u.lt(&p.to_dtype(DType::F32)?)?.to_dtype(p.dtype())
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates); shared by the step for a
    /// per-sample generator.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        self.shared(|r| {
            let mut p: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = r.random_range(0..=i);
                p.swap(i, j);
            }
            p
        })
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

    /// A per-sample batch of 8 draws what two of 4 (offsets 0 and 4) draw, sample by sample,
    /// whatever the draw: normal and uniform tensors with the sample axis first or inside,
    /// Bernoulli, one integer per sample; draws without a sample axis are the step's, shared.
    #[test]
    fn per_sample_draws_do_not_depend_on_the_split() -> Result<()> {
        let dev = Device::Cpu;
        let draws = |r: &mut GmRng, n: usize| -> Result<Vec<Tensor>> {
            let p = Tensor::full(0.3f32, (n, 5), &dev)?;
            Ok(vec![
                r.randn((n, 3), &dev)?,
                r.uniform((2, n, 2), -1.0, 1.0, &dev)?,
                r.bernoulli(&p)?,
                Tensor::new(
                    r.per_sample_u64(n)
                        .iter()
                        .map(|v| (v % 1000) as u32)
                        .collect::<Vec<_>>(),
                    &dev,
                )?,
                r.randn(7, &dev)?,
                Tensor::new(r.next_u64() as u32, &dev)?,
            ])
        };
        let whole = draws(&mut GmRng::per_sample(11, 5, 0, 8), 8)?;
        let a = draws(&mut GmRng::per_sample(11, 5, 0, 4), 4)?;
        let b = draws(&mut GmRng::per_sample(11, 5, 4, 4), 4)?;
        let axis = [0, 1, 0, 0];
        for (i, &ax) in axis.iter().enumerate() {
            let joined = Tensor::cat(&[&a[i], &b[i]], ax)?;
            assert_eq!(
                joined
                    .flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?,
                whole[i]
                    .flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?,
                "draw {i}"
            );
        }
        // Shared draws: the same in every part of the step.
        for i in 4..6 {
            let v = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
            assert_eq!(v(&a[i])?, v(&whole[i])?);
            assert_eq!(v(&b[i])?, v(&whole[i])?);
        }
        // Another step or seed draws other numbers.
        let other = draws(&mut GmRng::per_sample(11, 6, 0, 8), 8)?;
        assert_ne!(
            other[0].flatten_all()?.to_vec1::<f32>()?,
            whole[0].flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    /// For a stream generator the per-sample helpers are the stream's next numbers, so code
    /// that moved to them draws what it drew before.
    #[test]
    fn per_sample_helpers_continue_a_stream() {
        let mut a = GmRng::new(4);
        let mut b = GmRng::new(4);
        let u: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(b.per_sample_u64(5), u);
        let f: Vec<f64> = (0..3).map(|_| a.uniform_f64()).collect();
        assert_eq!(b.per_sample_f64(3), f);
    }

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
