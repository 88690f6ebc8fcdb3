//! Counts of the bytes gm moves between the host and a model's device.
//!
//! gm draws every random number on the host ([`crate::GmRng`]) and uploads it, and the trainer
//! uploads each batch and reads back the loss and its parts: that is what makes runs reproducible
//! across devices and `gm doctor`'s comparisons exact, and it costs transfers on a GPU. These
//! process-wide counters record them (on every device, so that a CPU run measures what a GPU run
//! would move); `gm bench` reports them per train step.

use candle_core::{Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

static UP_BYTES: AtomicU64 = AtomicU64::new(0);
static UP_COUNT: AtomicU64 = AtomicU64::new(0);
static DOWN_BYTES: AtomicU64 = AtomicU64::new(0);
static DOWN_COUNT: AtomicU64 = AtomicU64::new(0);

/// Totals since the start of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Bytes made on the host and uploaded (random numbers, batches).
    pub upload_bytes: u64,
    /// Number of uploads.
    pub uploads: u64,
    /// Bytes read back to the host (losses, gradient norms, labels).
    pub readback_bytes: u64,
    /// Number of read-backs (each one waits for the device).
    pub readbacks: u64,
}

impl Traffic {
    /// The sum of two counts.
    pub fn plus(&self, o: &Traffic) -> Traffic {
        Traffic {
            upload_bytes: self.upload_bytes + o.upload_bytes,
            uploads: self.uploads + o.uploads,
            readback_bytes: self.readback_bytes + o.readback_bytes,
            readbacks: self.readbacks + o.readbacks,
        }
    }

    /// The traffic between `earlier` and `self`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            upload_bytes: self.upload_bytes - earlier.upload_bytes,
            uploads: self.uploads - earlier.uploads,
            readback_bytes: self.readback_bytes - earlier.readback_bytes,
            readbacks: self.readbacks - earlier.readbacks,
        }
    }
}

/// The counters now.
pub fn snapshot() -> Traffic {
    Traffic {
        upload_bytes: UP_BYTES.load(Ordering::Relaxed),
        uploads: UP_COUNT.load(Ordering::Relaxed),
        readback_bytes: DOWN_BYTES.load(Ordering::Relaxed),
        readbacks: DOWN_COUNT.load(Ordering::Relaxed),
    }
}

/// Records one upload of `bytes`.
pub fn record_upload(bytes: usize) {
    UP_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    UP_COUNT.fetch_add(1, Ordering::Relaxed);
}

/// Records one read-back of `bytes`.
pub fn record_readback(bytes: usize) {
    DOWN_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    DOWN_COUNT.fetch_add(1, Ordering::Relaxed);
}

/// Bytes of a tensor's elements.
pub fn bytes_of(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Reads a scalar tensor back as `f64`, counting the read-back.
pub fn read_f64(t: &Tensor) -> Result<f64> {
    record_readback(bytes_of(t));
    t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// `Tensor::from_vec` on `device`, counted as an upload.
pub fn upload<D: candle_core::WithDType, S: Into<candle_core::Shape>>(
    v: Vec<D>,
    shape: S,
    device: &candle_core::Device,
) -> Result<Tensor> {
    record_upload(v.len() * D::DTYPE.size_in_bytes());
    Tensor::from_vec(v, shape, device)
}
