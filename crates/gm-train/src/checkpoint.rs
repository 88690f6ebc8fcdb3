//! Checkpoints: safetensors files with metadata, written atomically.
//!
//! A run directory holds `checkpoints/step-00001000.safetensors` (the weights to use — the EMA
//! weights when EMA is on — under PyTorch `state_dict` names, plus metadata: model kind, the
//! resolved config, step, gm version, data source) and `step-00001000.state.safetensors` (Adam
//! moments, raw weights when EMA is on, RNG state, best metric). `best.safetensors` is the
//! weights file of the best evaluation. Every file is written to a temporary name, fsynced and
//! renamed, so a kill at any moment leaves the previous checkpoint intact.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
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
        if let Some(s) = complete_steps(path).last() {
            return Ok(weights_path(path, *s));
        }
        let best = checkpoint_dir(path).join("best.safetensors");
        if best.is_file() {
            return Ok(best);
        }
        bail!(
            "{}: no checkpoint found (expected checkpoints/step-*.safetensors)",
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
