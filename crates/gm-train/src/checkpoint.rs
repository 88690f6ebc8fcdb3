//! Checkpoints: safetensors files with metadata, written atomically.
//!
//! A run directory holds `checkpoints/step-00001000.safetensors` (the weights to use — the EMA
//! weights when EMA is on — under PyTorch `state_dict` names, plus metadata: model kind, the
//! resolved config, step, gm version, data source) and `step-00001000.state.safetensors` (Adam
//! moments, raw weights when EMA is on, RNG state, best metric). `best.safetensors` is the
//! weights file of the best evaluation. Every file is written to a temporary name, fsynced and
//! renamed, so a kill at any moment leaves the previous checkpoint intact.

use crate::config::RunConfig;
use crate::optim::{named_vars, Adam};
use crate::trainer::{build, Built};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gm_core::{GmRng, RngState};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "gm-checkpoint-1";

/// Writes `bytes` to `path` atomically: temp file in the same folder, fsync, rename, fsync dir.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        Ok(())
    })();
    if let Err(e) = written {
        // A full disk must not leave a partial file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    crash_point("after-write", path);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    crash_point("after-rename", path);
    Ok(())
}

/// Fault injection for crash-safety tests: `GM_CRASH_AT=after-write:NAME` kills the process
/// (abort, no unwinding, like `kill -9`) once the temporary file of `NAME` is written and synced
/// but not yet renamed; `after-rename:NAME` once it is in place. `NAME` is a file name such as
/// `step-00000004.state.safetensors`. Never set it outside such a test.
fn crash_point(at: &str, path: &Path) {
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(spec) = SPEC.get_or_init(|| std::env::var("GM_CRASH_AT").ok()) else {
        return;
    };
    let hit = spec.strip_prefix(at).and_then(|r| r.strip_prefix(':'));
    if hit.is_some_and(|name| {
        path.file_name()
            .is_some_and(|f| f.to_string_lossy() == name)
    }) {
        eprintln!("gm: GM_CRASH_AT={spec}: stopping the process here");
        std::process::abort();
    }
}

/// Serialises named tensors and string metadata to safetensors bytes.
pub fn to_safetensors(
    tensors: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let cpu: Vec<(String, Tensor)> = sorted
        .into_iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let mut meta = meta.clone();
    meta.remove(HASH_KEY);
    meta.remove(META_HASH_KEY);
    let meta_hash = meta_hash(&meta);
    meta.insert(HASH_KEY.into(), content_hash(&cpu));
    meta.insert(META_HASH_KEY.into(), meta_hash);
    let bytes = safetensors::serialize(cpu, Some(meta))?;
    canonical_header(bytes)
}

/// The metadata key of the tensors' content hash.
pub const HASH_KEY: &str = "gm.sha256";

/// The metadata key of the hash of the other metadata (the config, the step, …): a flipped bit
/// in `gm.config` could change a model's settings without breaking its shapes.
pub const META_HASH_KEY: &str = "gm.meta_sha256";

/// SHA-256 over the metadata entries in key order, the two hash keys left out.
pub fn meta_hash(meta: &HashMap<String, String>) -> String {
    use sha2::Digest;
    let mut keys: Vec<&String> = meta
        .keys()
        .filter(|k| *k != HASH_KEY && *k != META_HASH_KEY)
        .collect();
    keys.sort();
    let mut h = sha2::Sha256::new();
    for k in keys {
        for part in [k.as_bytes(), meta[k].as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 over every tensor in name order: its name, dtype, shape and bytes. safetensors has no
/// checksum of its own; gm stores this at save time and checks it on load, so a flipped bit in a
/// weight is an error naming the file rather than a silently different model.
pub fn content_hash<V: safetensors::View>(tensors: &[(String, V)]) -> String {
    use sha2::Digest;
    let mut order: Vec<&(String, V)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = sha2::Sha256::new();
    for (name, t) in order {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{:?}", t.dtype()).as_bytes());
        for d in t.shape() {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(t.data());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a file's stored [`HASH_KEY`] against its tensors (files without one — written by other
/// tools or older gm versions — pass). `GM_SKIP_CHECKSUM=1` skips the check.
fn verify_hash(path: &Path, bytes: &[u8], meta: &HashMap<String, String>) -> Result<()> {
    if std::env::var("GM_SKIP_CHECKSUM").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    if let Some(want) = meta.get(META_HASH_KEY) {
        if &meta_hash(meta) != want {
            bail!(
                "{}: the metadata (config, step, …) does not match the checksum stored at save time ({META_HASH_KEY}): the file is corrupt (restore it from a copy, or set GM_SKIP_CHECKSUM=1 to load it anyway)",
                path.display()
            );
        }
    }
    let Some(want) = meta.get(HASH_KEY) else {
        return Ok(());
    };
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let got = content_hash(&st.tensors());
    if &got != want {
        bail!(
            "{}: the tensors do not match the checksum stored at save time ({HASH_KEY}): the file is corrupt (restore it from a copy, or set GM_SKIP_CHECKSUM=1 to load it anyway)",
            path.display()
        );
    }
    Ok(())
}

/// The same safetensors bytes with the JSON header's keys sorted (metadata included): safetensors
/// writes the metadata in a hash map's order, which changes from process to process, so
/// identical runs would write different files. With this, equal tensors and metadata give equal
/// bytes.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use std::collections::BTreeMap;
    let bad = || anyhow!("safetensors produced a malformed header");
    let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(bad)?.try_into()?) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(bad)?;
    let top: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)?;
    let sorted: BTreeMap<String, serde_json::Value> = top
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::Object(m) => serde_json::to_value(
                    m.into_iter()
                        .collect::<BTreeMap<String, serde_json::Value>>(),
                )?,
                v => v,
            };
            Ok((k, v))
        })
        .collect::<Result<_>>()?;
    let mut h = serde_json::to_string(&sorted)?.into_bytes();
    // safetensors aligns the data to 8 bytes by padding the header with spaces.
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// A safetensors file read back: tensors and metadata.
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

pub fn read_safetensors(path: &Path, device: &Device) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    verify_hash(path, &bytes, &meta)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("{}: cannot decode tensors", path.display()))?;
    Ok(Loaded { tensors, meta })
}

/// The string metadata of a safetensors file, from its header alone (the tensors are not read).
pub fn read_meta(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let bad = |why: &str| anyhow!("{}: not a safetensors file ({why})", path.display());
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than 8 bytes"))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad("header length out of range"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| bad("truncated header"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| bad("header is not JSON"))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

pub fn checkpoint_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

pub fn weights_path(run: &Path, step: usize) -> PathBuf {
    checkpoint_dir(run).join(format!("step-{step:08}.safetensors"))
}

pub fn state_path(run: &Path, step: usize) -> PathBuf {
    checkpoint_dir(run).join(format!("step-{step:08}.state.safetensors"))
}

/// Steps that have both a weights file and a state file, ascending.
pub fn complete_steps(run: &Path) -> Vec<usize> {
    let Ok(rd) = std::fs::read_dir(checkpoint_dir(run)) else {
        return vec![];
    };
    let mut steps: Vec<usize> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()
        })
        .filter(|s| state_path(run, *s).is_file())
        .collect();
    steps.sort();
    steps
}

/// Refuses to start a fresh run in `run` when that directory already holds a run or anything
/// else: a run directory is never mixed with another run. A missing or empty directory is fine.
pub fn ensure_fresh_run_dir(run: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(run) else {
        if run.exists() {
            bail!(
                "--out {} exists and is not a readable directory",
                run.display()
            );
        }
        return Ok(());
    };
    let entries: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let steps = complete_steps(run);
    if let Some(last) = steps.last() {
        bail!(
            "{} already holds a run (checkpoints up to step {last}): continue it with `gm train --resume {}` (and --set train.steps=N to go further), or give a new --out directory",
            run.display(),
            run.display()
        );
    }
    if entries
        .iter()
        .any(|e| e == "config.toml" || e == "metrics.jsonl")
    {
        bail!(
            "{} already holds a run that left no complete checkpoint: remove it or give a new --out directory",
            run.display()
        );
    }
    bail!(
        "--out {} is not empty ({} entries, e.g. '{}'): a run gets a directory of its own; give a new --out directory",
        run.display(),
        entries.len(),
        entries[0]
    )
}

/// Removes the temporary files that an interrupted [`atomic_write`] left in a run directory and
/// its `checkpoints/` (`.NAME.tmp-PID`); returns how many. A resumed run calls it first.
pub fn remove_stale_temps(run: &Path) -> usize {
    let mut n = 0;
    for dir in [run.to_path_buf(), checkpoint_dir(run)] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.')
                && name.contains(".tmp-")
                && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// The first of `base`, `base-2`, `base-3`, … that is missing or empty: where a run goes when no
/// `--out` was given and the preset's default directory is taken.
pub fn free_run_dir(base: &Path) -> PathBuf {
    let free = |p: &Path| ensure_fresh_run_dir(p).is_ok();
    if free(base) {
        return base.to_path_buf();
    }
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    (2..)
        .map(|i| base.with_file_name(format!("{name}-{i}")))
        .find(|p| free(p))
        .expect("an unbounded range has a free name")
}

/// Resolves `--checkpoint`: a weights file, or a run directory (its latest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        if let Some(w) = crate::export::exported_weights(path) {
            return Ok(w);
        }
        if let Some(s) = complete_steps(path).last() {
            return Ok(weights_path(path, *s));
        }
        let best = checkpoint_dir(path).join("best.safetensors");
        if best.is_file() {
            return Ok(best);
        }
        bail!(
            "{}: no checkpoint found (expected a gm run directory with checkpoints/step-*.safetensors, a folder from gm export, or a diffusers folder with config.json and diffusion_pytorch_model.safetensors)",
            path.display()
        );
    }
    bail!("checkpoint {} does not exist", path.display())
}

/// Deletes all but the newest `keep` complete checkpoints.
pub fn prune(run: &Path, keep: usize) -> Result<()> {
    let steps = complete_steps(run);
    if steps.len() > keep {
        for s in &steps[..steps.len() - keep] {
            std::fs::remove_file(weights_path(run, *s))?;
            std::fs::remove_file(state_path(run, *s))?;
        }
    }
    Ok(())
}

/// Copies `tensors[prefix + name]` into every variable; errors name the file and the tensor.
pub fn set_vars(
    vm: &VarMap,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    origin: &Path,
    strict: bool,
) -> Result<()> {
    let vars = named_vars(vm);
    for (name, var) in &vars {
        set_var(var, tensors, &format!("{prefix}{name}"), origin)?;
    }
    if strict {
        let known: std::collections::HashSet<&String> = vars.iter().map(|(n, _)| n).collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k)).collect();
        if !extra.is_empty() {
            bail!(
                "{}: unexpected tensors {:?} for this model",
                origin.display(),
                extra
            );
        }
    }
    Ok(())
}

fn set_var(var: &Var, tensors: &HashMap<String, Tensor>, key: &str, origin: &Path) -> Result<()> {
    let t = tensors
        .get(key)
        .ok_or_else(|| anyhow!("{}: missing tensor '{key}'", origin.display()))?;
    if t.dims() != var.dims() {
        bail!(
            "{}: tensor '{key}' has shape {:?}, the model expects {:?}",
            origin.display(),
            t.dims(),
            var.dims()
        );
    }
    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    Ok(())
}

/// The variables named `prefix…` from another model's tensors, named without the prefix (an
/// EBM's `noise_flow.*` from a RealNVP checkpoint): each must be there with its shape, and every
/// tensor must be used. Returns how many were set.
pub fn set_vars_under(
    vm: &VarMap,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    origin: &Path,
) -> Result<usize> {
    let vars: Vec<(String, Var)> = named_vars(vm)
        .into_iter()
        .filter_map(|(n, v)| n.strip_prefix(prefix).map(|k| (k.to_string(), v)))
        .collect();
    for (key, var) in &vars {
        set_var(var, tensors, key, origin)?;
    }
    let known: std::collections::HashSet<&String> = vars.iter().map(|(n, _)| n).collect();
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k)).collect();
    if !extra.is_empty() {
        extra.sort();
        bail!(
            "{}: tensors {:?} have no place under '{prefix}' in this model",
            origin.display(),
            extra
        );
    }
    Ok(vars.len())
}

/// A model loaded from a checkpoint file, with the metadata it carried.
pub struct LoadedCheckpoint {
    pub built: Built,
    pub step: usize,
    pub meta: HashMap<String, String>,
    pub path: PathBuf,
}

/// Rebuilds a model from a weights file or run directory: the file's metadata holds the config.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    load_checkpoint_with(path, device, &[])
}

/// [`load_checkpoint`] with `key=value` overrides applied to the stored config first — settings
/// that leave the parameters alone, such as `model.sampler.steps=10` or `model.solver.method=rk4`
/// (an override that changes a parameter's shape fails to load, naming the tensor).
pub fn load_checkpoint_with(
    path: &Path,
    device: &Device,
    overrides: &[String],
) -> Result<LoadedCheckpoint> {
    if path.is_dir() && crate::diffusers::unet_folder(path).is_some() {
        return load_diffusers(path, device, overrides);
    }
    let path = resolve(path)?;
    let l = read_safetensors(&path, device)?;
    let text = l.meta.get("gm.config").ok_or_else(|| {
        anyhow!(
            "{}: no gm.config metadata (not a gm checkpoint?)",
            path.display()
        )
    })?;
    let cfg =
        RunConfig::from_toml_str(text, overrides, &format!("{} (gm.config)", path.display()))?;
    check_checkpoint_meta(&path, &l.meta, &cfg)?;
    for (name, t) in &l.tensors {
        if t.dtype() != DType::F32 {
            bail!(
                "{}: tensor '{name}' is {:?}; gm checkpoints hold f32 weights",
                path.display(),
                t.dtype()
            );
        }
        // A sum propagates NaN and ±inf from any element (candle's max skips a NaN that is not
        // first), and f32 values cannot overflow it in f64.
        let finite = t
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
            .is_finite();
        if !finite {
            bail!(
                "{}: tensor '{name}' holds NaN or infinite values: these weights cannot be evaluated or sampled (use an earlier checkpoint of the run)",
                path.display()
            );
        }
    }
    let built = build(&cfg, device)?;
    set_vars(&built.varmap, &l.tensors, "", &path, true)?;
    let step = l
        .meta
        .get("gm.step")
        .map(|s| s.parse::<usize>())
        .transpose()
        .map_err(|_| {
            anyhow!(
                "{}: gm.step = '{}' is not a step number",
                path.display(),
                l.meta["gm.step"]
            )
        })?
        .unwrap_or(0);
    Ok(LoadedCheckpoint {
        built,
        step,
        meta: l.meta,
        path,
    })
}

/// A diffusers model folder read as a gm DDPM (see [`crate::diffusers`]).
fn load_diffusers(dir: &Path, device: &Device, overrides: &[String]) -> Result<LoadedCheckpoint> {
    let im = crate::diffusers::import(dir)?;
    let origin = format!("{} (diffusers)", dir.display());
    let cfg = RunConfig::from_toml_str(&im.config.to_toml(), overrides, &origin)?;
    let built = build(&cfg, device)?;
    set_vars(&built.varmap, &im.tensors, "", dir, true)?;
    let meta = HashMap::from([
        ("gm.kind".to_string(), cfg.model.kind().to_string()),
        ("gm.config".to_string(), im.config.to_toml()),
        ("gm.source".to_string(), im.notes.join("; ")),
    ]);
    Ok(LoadedCheckpoint {
        built,
        step: 0,
        meta,
        path: dir.to_path_buf(),
    })
}

/// Checks a gm checkpoint's metadata: the format version this gm reads, and a kind that agrees
/// with the stored config. Errors name the file, the key and what was found.
fn check_checkpoint_meta(
    path: &Path,
    meta: &HashMap<String, String>,
    cfg: &RunConfig,
) -> Result<()> {
    if let Some(f) = meta.get("gm.format") {
        if f != FORMAT {
            bail!(
                "{}: gm.format = '{f}', this gm (version {}) reads '{}': use the gm version that wrote it ({})",
                path.display(),
                env!("CARGO_PKG_VERSION"),
                FORMAT,
                meta.get("gm.version").map(String::as_str).unwrap_or("unknown")
            );
        }
    }
    if let Some(kind) = meta.get("gm.kind") {
        if kind != cfg.model.kind() {
            bail!(
                "{}: gm.kind = '{kind}' but its gm.config describes a '{}' model",
                path.display(),
                cfg.model.kind()
            );
        }
    }
    Ok(())
}

/// Everything one checkpoint of a run holds, borrowed from the trainer.
pub struct RunCheckpoint<'a> {
    pub run: &'a Path,
    pub step: usize,
    pub cfg: &'a RunConfig,
    /// The config as the run directory's `config.toml` holds it.
    pub cfg_text: &'a str,
    pub data_source: &'a str,
    /// What the data adds to the weights file (a text run's tokenizer).
    pub weights_meta: HashMap<String, String>,
    pub vars: &'a [(String, Var)],
    /// Weights for the weights file in place of the live parameters (the EMA's); the live
    /// ones then go to the state file as `param.NAME`.
    pub eval_weights: Option<&'a [Tensor]>,
    pub adams: &'a [Adam],
    pub rng: &'a GmRng,
    pub best: f64,
    /// What hooks add to the state file.
    pub extra_tensors: HashMap<String, Tensor>,
    pub extra_meta: HashMap<String, String>,
}

/// Writes `step-N.state.safetensors` then `step-N.safetensors` (the pair is complete only once
/// the weights exist), prunes to `train.keep_last`, and returns the weights' path and bytes.
pub fn write_run_checkpoint(c: RunCheckpoint) -> Result<(PathBuf, Vec<u8>)> {
    let mut meta = HashMap::from([
        ("gm.format".to_string(), FORMAT.to_string()),
        ("gm.kind".to_string(), c.cfg.model.kind().to_string()),
        ("gm.config".to_string(), c.cfg_text.to_string()),
        ("gm.step".to_string(), c.step.to_string()),
        (
            "gm.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("gm.data".to_string(), c.data_source.to_string()),
        ("gm.ema".to_string(), c.eval_weights.is_some().to_string()),
    ]);
    meta.extend(c.weights_meta);
    let mut weights = HashMap::new();
    // Parameter names are disjoint between the phases' optimisers: one map holds all.
    let mut state: HashMap<String, Tensor> = c.adams.iter().flat_map(|o| o.state()).collect();
    state.extend(c.extra_tensors);
    for (i, (name, v)) in c.vars.iter().enumerate() {
        match c.eval_weights {
            Some(w) => {
                weights.insert(name.clone(), w[i].clone());
                state.insert(format!("param.{name}"), v.as_tensor().clone());
            }
            None => {
                weights.insert(name.clone(), v.as_tensor().clone());
            }
        }
    }
    let mut smeta = HashMap::from([
        ("gm.step".to_string(), c.step.to_string()),
        ("gm.adam_t".to_string(), c.adams[0].steps().to_string()),
        ("gm.rng".to_string(), serde_json::to_string(&c.rng.state())?),
        ("gm.best".to_string(), c.best.to_string()),
    ]);
    for (i, o) in c.adams.iter().enumerate().skip(1) {
        smeta.insert(format!("gm.adam_t.{i}"), o.steps().to_string());
    }
    smeta.extend(c.extra_meta);
    atomic_write(&state_path(c.run, c.step), &to_safetensors(&state, &smeta)?)?;
    let wp = weights_path(c.run, c.step);
    meta.insert("gm.best".to_string(), c.best.to_string());
    let bytes = to_safetensors(&weights, &meta)?;
    atomic_write(&wp, &bytes)?;
    prune(c.run, c.cfg.train.keep_last)?;
    Ok((wp, bytes))
}

/// State-file key of the data folder a run was started with (`--data-dir`).
pub const DATA_DIR_KEY: &str = "gm.data_dir";

/// The data folder recorded in the run's latest complete checkpoint, if any.
pub fn saved_data_dir(run: &Path) -> Option<PathBuf> {
    let step = *complete_steps(run).last()?;
    let meta = read_meta(&state_path(run, step)).ok()?;
    meta.get(DATA_DIR_KEY).map(PathBuf::from)
}

/// The latest complete checkpoint of a run to resume, checked against the config.
pub struct ResumePoint {
    pub step: usize,
    pub weights: Loaded,
    pub state: Loaded,
    pub weights_path: PathBuf,
    pub state_path: PathBuf,
}

/// Opens the latest complete checkpoint of `run` for `--resume`: removes temporary files an
/// interrupted write left, refuses a `train.steps` that leaves nothing to run and a model config
/// that differs from the run's.
pub fn open_resume(run: &Path, cfg: &RunConfig, device: &Device) -> Result<ResumePoint> {
    let Some(&step) = complete_steps(run).last() else {
        bail!("--resume: {} has no complete checkpoint", run.display());
    };
    let stale = remove_stale_temps(run);
    if stale > 0 {
        eprintln!(
            "gm: removed {stale} temporary file(s) an interrupted write left in {}",
            run.display()
        );
    }
    if cfg.train.steps <= step {
        bail!(
            "--resume: {} has run {step} steps and train.steps = {} leaves none to run; give more with --set train.steps=N (N > {step})",
            run.display(),
            cfg.train.steps
        );
    }
    let saved_cfg = std::fs::read_to_string(run.join("config.toml")).unwrap_or_default();
    let saved = RunConfig::from_toml_str(&saved_cfg, &[], "config.toml").ok();
    if saved.as_ref().map(|s| &s.model) != Some(&cfg.model) {
        bail!(
            "--resume: the model config differs from {}/config.toml",
            run.display()
        );
    }
    let wp = weights_path(run, step);
    let sp = state_path(run, step);
    Ok(ResumePoint {
        step,
        weights: read_safetensors(&wp, device)?,
        state: read_safetensors(&sp, device)?,
        weights_path: wp,
        state_path: sp,
    })
}

impl ResumePoint {
    /// Restores each optimiser's moments and step count.
    pub fn restore_optimizers(&self, adams: &mut [Adam]) -> Result<()> {
        let meta = &self.state.meta;
        let adam_t = meta
            .get("gm.adam_t")
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.step);
        for (i, opt) in adams.iter_mut().enumerate() {
            let t_i = match i {
                0 => adam_t,
                i => meta
                    .get(&format!("gm.adam_t.{i}"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(adam_t),
            };
            opt.load_state(&self.state.tensors, t_i).with_context(|| {
                format!(
                    "{}: this optimizer state does not belong to the run's model",
                    self.state_path.display()
                )
            })?;
        }
        Ok(())
    }

    /// The run's random generator as it was after the checkpoint's step.
    pub fn rng(&self) -> Result<GmRng> {
        let rs: RngState = serde_json::from_str(
            self.state
                .meta
                .get("gm.rng")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .with_context(|| format!("{}: bad gm.rng metadata", self.state_path.display()))?;
        Ok(GmRng::from_state(rs))
    }

    /// The best primary metric so far.
    pub fn best(&self) -> f64 {
        self.state
            .meta
            .get("gm.best")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata_and_atomic_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
        );
        let mut m = HashMap::new();
        m.insert("gm.step".to_string(), "12".to_string());
        atomic_write(&p, &to_safetensors(&t, &m).unwrap()).unwrap();
        let l = read_safetensors(&p, &Device::Cpu).unwrap();
        assert_eq!(l.meta["gm.step"], "12");
        assert_eq!(read_meta(&p).unwrap(), l.meta);
        assert_eq!(
            l.tensors["w"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        // No temp files left behind.
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1);
        std::fs::write(&p, b"garbage").unwrap();
        let e = read_safetensors(&p, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a.safetensors") && e.contains("not a safetensors"),
            "{e}"
        );
        let e = read_meta(&p).err().unwrap().to_string();
        assert!(
            e.contains("a.safetensors") && e.contains("not a safetensors"),
            "{e}"
        );
    }

    #[test]
    fn resolve_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        assert!(resolve(run).is_err());
        for s in [5, 10, 15] {
            atomic_write(&weights_path(run, s), b"x").unwrap();
            atomic_write(&state_path(run, s), b"x").unwrap();
        }
        // A weights file without its state (a crash between the two writes) is not "complete".
        atomic_write(&weights_path(run, 20), b"x").unwrap();
        assert_eq!(complete_steps(run), vec![5, 10, 15]);
        assert_eq!(resolve(run).unwrap(), weights_path(run, 15));
        prune(run, 2).unwrap();
        assert_eq!(complete_steps(run), vec![10, 15]);
    }
}
