//! gm from Python (module `gm_py`, built by maturin or as a plain cdylib):
//!
//! ```python
//! import gm_py as gm
//! summary = gm.train("models/vae-tiny.toml", data_dir="mnist", out="runs/vae-tiny")
//! m = gm.load("runs/vae-tiny")          # a run directory, a checkpoint file or a `gm export` folder
//! x = m.sample(16)                      # numpy float32, (16, 1, 28, 28), in [0, 1]
//! lp = m.log_prob(x)                    # numpy float64, (16,), nats per image
//! m.eval(data_dir="mnist", max_images=100)  # dict, the numbers `gm eval` prints
//! ```
//!
//! Errors are Python exceptions carrying gm's message (`ValueError` for bad arguments,
//! `RuntimeError` otherwise). The extension reads data from folders only: it is built without
//! gm's HTTPS download stack.

use candle_core::{DType, Device, Tensor};
use gm_core::{select_device, DeviceChoice, GmRng};
use gm_models::Batch;
use gm_train::checkpoint::{free_run_dir, load_checkpoint_with, LoadedCheckpoint};
use gm_train::data::{load_data, Split};
use gm_train::eval::{evaluate_full, likelihood_estimate_label, sample_chunked, SAMPLE_CHUNK};
use gm_train::{RunConfig, TrainOptions};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;

fn runtime(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

fn candle(e: candle_core::Error) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn device_of(name: &str) -> PyResult<Device> {
    let choice: DeviceChoice = name.parse().map_err(PyValueError::new_err)?;
    select_device(choice).map(|d| d.0).map_err(candle)
}

/// A JSON value as the matching Python object (dict, list, float, int, str, bool, None).
fn to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<Py<PyAny>> {
    Ok(match v {
        serde_json::Value::Null => py.None(),
        serde_json::Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any().unbind(),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any().unbind(),
            (None, Some(f)) => f.into_pyobject(py)?.into_any().unbind(),
            _ => py.None(),
        },
        serde_json::Value::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        serde_json::Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        serde_json::Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

/// Trains a model from a TOML preset, as `gm train --config CONFIG` does; returns a dict with
/// the run directory, steps, first and last loss, the last checkpoint and the final evaluation.
/// `out` defaults to `runs/PRESET` (a fresh sibling when that holds an earlier run);
/// `overrides` are `KEY=VALUE` strings like `--set`'s.
#[pyfunction]
#[pyo3(signature = (config, data_dir=None, out=None, overrides=None, seed=None, progress=false, device="cpu"))]
#[allow(clippy::too_many_arguments)]
fn train(
    py: Python<'_>,
    config: PathBuf,
    data_dir: Option<PathBuf>,
    out: Option<PathBuf>,
    overrides: Option<Vec<String>>,
    seed: Option<u64>,
    progress: bool,
    device: &str,
) -> PyResult<Py<PyAny>> {
    let mut overrides = overrides.unwrap_or_default();
    if let Some(s) = seed {
        overrides.push(format!("train.seed={s}"));
    }
    let cfg = RunConfig::load(&config, &overrides).map_err(runtime)?;
    if cfg.model.second_order() {
        gm_models::gan::enable_second_order_gradients();
    }
    let out = out.unwrap_or_else(|| {
        let stem = config
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "run".into());
        free_run_dir(&PathBuf::from("runs").join(stem))
    });
    let opts = TrainOptions {
        out: out.clone(),
        device: device_of(device)?,
        data_dir,
        resume: false,
        progress,
        init_from: None,
    };
    let s = gm_train::train(&cfg, &opts).map_err(runtime)?;
    let v = serde_json::json!({
        "run": out.display().to_string(),
        "steps": s.steps,
        "first_loss": s.losses.first().map(|l| l.1),
        "last_loss": s.losses.last().map(|l| l.1),
        "checkpoint": s.checkpoint.display().to_string(),
        "eval": s.last_eval,
        "data": s.data_source,
    });
    to_py(py, &v)
}

/// A trained gm model: `gm.load(path)`.
#[pyclass(unsendable, module = "gm_py")]
struct Model {
    ck: LoadedCheckpoint,
    device: Device,
    /// Calls of `sample` / `log_prob` without a seed so far (each gets the next seed).
    draws: u64,
}

impl Model {
    fn next_seed(&mut self, seed: Option<u64>) -> u64 {
        seed.unwrap_or_else(|| {
            self.draws += 1;
            self.ck
                .built
                .cfg
                .eval
                .seed
                .wrapping_add(self.draws.wrapping_sub(1))
        })
    }
}

/// Loads a run directory (its latest checkpoint), a `.safetensors` checkpoint or a folder from
/// `gm export`. `overrides` change settings that leave the weights alone (e.g.
/// `"model.sampler.steps=10"`).
#[pyfunction]
#[pyo3(signature = (path, device="cpu", overrides=None))]
fn load(path: PathBuf, device: &str, overrides: Option<Vec<String>>) -> PyResult<Model> {
    let device = device_of(device)?;
    if gm_train::text::is_text_checkpoint(&path).map_err(runtime)? {
        return Err(PyValueError::new_err(format!(
            "{}: a text model; gm_py loads image and 2-D models",
            path.display()
        )));
    }
    let ck =
        load_checkpoint_with(&path, &device, &overrides.unwrap_or_default()).map_err(runtime)?;
    Ok(Model {
        ck,
        device,
        draws: 0,
    })
}

#[pymethods]
impl Model {
    /// The model family, e.g. "vae".
    #[getter]
    fn kind(&self) -> &'static str {
        self.ck.built.model.kind()
    }

    /// Training steps behind these weights.
    #[getter]
    fn step(&self) -> usize {
        self.ck.step
    }

    /// `(C, H, W)` of the images the model reads and draws.
    #[getter]
    fn image_shape(&self) -> Option<(usize, usize, usize)> {
        self.ck
            .built
            .cfg
            .model
            .image_shape()
            .map(|s| (s[0], s[1], s[2]))
    }

    /// How `log_prob` stands to the true log-density: "exact", "bound (...)", "ODE" or
    /// "learned normaliser"; None for models without a likelihood.
    #[getter]
    fn likelihood_estimate(&self) -> Option<String> {
        let m = self.ck.built.model.as_ref();
        m.likelihood_metric()
            .map(|_| likelihood_estimate_label(m, self.ck.built.cfg.eval.iwae_k))
    }

    /// The run's configuration as a dict (`model`, `data`, `train`, `eval`).
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let v = serde_json::to_value(&self.ck.built.cfg)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        to_py(py, &v)
    }

    /// `n` samples as a float32 array `(n, C, H, W)` in `[0, 1]` (2-D models: `(n, 2, 1, 1)`).
    /// Without a seed, each call draws fresh ones (seeds follow the config's eval seed).
    #[pyo3(signature = (n, seed=None))]
    fn sample<'py>(
        &mut self,
        py: Python<'py>,
        n: usize,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        gm_train::eval::check_sample_count("n", n)
            .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        let seed = self.next_seed(seed);
        let m = self.ck.built.model.as_ref();
        let s = sample_chunked(m, n, SAMPLE_CHUNK, &mut GmRng::new(seed))
            .map_err(runtime)?
            .ok_or_else(|| {
                PyValueError::new_err(format!("a '{}' model does not sample", m.kind()))
            })?;
        let dims = s.dims().to_vec();
        let v = s
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle)?;
        Ok(PyArray1::from_vec(py, v).reshape(dims)?.into_any())
    }

    /// `log p(x)` in nats per image, float64 `(n,)`, for images `x` of shape `(n, C, H, W)` in
    /// `[0, 1]` (float32 or float64): the same estimate `gm eval` averages (see
    /// `likelihood_estimate`; a VAE's is its IWAE bound with the config's `eval.iwae_k`). Models
    /// of binarised data take 0/1 pixels; models of 8-bit data the dequantised values, on the
    /// 8-bit scale.
    #[pyo3(signature = (x, seed=None))]
    fn log_prob<'py>(
        &mut self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let seed = self.next_seed(seed);
        let (values, shape): (Vec<f32>, Vec<usize>) =
            if let Ok(a) = x.extract::<PyReadonlyArrayDyn<f32>>() {
                (a.as_array().iter().copied().collect(), a.shape().to_vec())
            } else if let Ok(a) = x.extract::<PyReadonlyArrayDyn<f64>>() {
                (
                    a.as_array().iter().map(|v| *v as f32).collect(),
                    a.shape().to_vec(),
                )
            } else {
                return Err(PyValueError::new_err(
                    "log_prob: x must be a float32 or float64 numpy array (n, C, H, W)",
                ));
            };
        let cfg = &self.ck.built.cfg;
        let model = self.ck.built.model.as_ref();
        let metric = model.likelihood_metric().ok_or_else(|| {
            PyValueError::new_err(format!("a '{}' model has no likelihood", model.kind()))
        })?;
        let want = cfg.model.image_shape().unwrap_or([0, 0, 0]);
        if shape.len() != 4 || shape[1..] != want[..] {
            return Err(PyValueError::new_err(format!(
                "log_prob: x has shape {shape:?}; this model reads (n, {}, {}, {})",
                want[0], want[1], want[2]
            )));
        }
        let toy = gm_train::data::toy_name(&cfg.data.dataset).is_some();
        if !toy {
            if let Some(bad) = values.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                return Err(PyValueError::new_err(format!(
                    "log_prob: x holds {bad}; images are in [0, 1]"
                )));
            }
            if cfg.data.binarize != gm_train::config::Binarize::None {
                if let Some(bad) = values.iter().find(|v| **v != 0.0 && **v != 1.0) {
                    return Err(PyValueError::new_err(format!(
                        "log_prob: x holds {bad}; this model was trained on binarised images and scores 0/1 pixels"
                    )));
                }
            }
        }
        let mut rng = GmRng::new(seed);
        let opts = gm_train::eval::full_options(cfg, None).map_err(runtime)?;
        let n = shape[0];
        let per = want.iter().product::<usize>();
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(cfg.eval.batch_size.max(1)) {
            let b = cfg.eval.batch_size.max(1).min(n - start);
            let xb = Tensor::from_slice(
                &values[start * per..(start + b) * per],
                (b, want[0], want[1], want[2]),
                &self.device,
            )
            .map_err(candle)?;
            let m = model
                .eval_metrics(
                    &Batch {
                        x: xb,
                        labels: None,
                    },
                    &mut rng,
                    &opts,
                )
                .map_err(candle)?;
            let nll = m
                .into_iter()
                .find(|(k, _)| k == metric)
                .ok_or_else(|| PyRuntimeError::new_err(format!("the model reported no {metric}")))?
                .1;
            let nll = nll
                .to_dtype(DType::F64)
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(candle)?;
            out.extend(nll.into_iter().map(|v| -v));
        }
        Ok(PyArray1::from_vec(py, out))
    }

    /// The metrics `gm eval` prints, as a dict: the test split (or "train") of `data_dir` (default:
    /// the run's own data folder), its first `max_images` images (0 = all).
    #[pyo3(signature = (data_dir=None, max_images=0, split="test"))]
    fn eval(
        &self,
        py: Python<'_>,
        data_dir: Option<PathBuf>,
        max_images: usize,
        split: &str,
    ) -> PyResult<Py<PyAny>> {
        let split = match split {
            "test" => Split::Test,
            "train" => Split::Train,
            s => {
                return Err(PyValueError::new_err(format!(
                    "split must be 'test' or 'train', not '{s}'"
                )))
            }
        };
        let cfg = &self.ck.built.cfg;
        let (ds, source) = load_data(cfg, data_dir.as_deref(), split).map_err(runtime)?;
        let m = evaluate_full(
            self.ck.built.model.as_ref(),
            cfg,
            &ds,
            None,
            max_images,
            &self.device,
        )
        .map_err(runtime)?;
        let mut v = serde_json::to_value(&m).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        v["data"] = serde_json::json!(source);
        v["step"] = serde_json::json!(self.ck.step);
        to_py(py, &v)
    }

    fn __repr__(&self) -> String {
        format!(
            "gm_py.Model(kind='{}', step={}, checkpoint='{}')",
            self.ck.built.model.kind(),
            self.ck.step,
            self.ck.path.display()
        )
    }
}

#[pymodule]
fn gm_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_class::<Model>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
